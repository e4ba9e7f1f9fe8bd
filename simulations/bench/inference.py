"""On-device inference: PyTorch vs ONNX Runtime INT4 vs llama.cpp, with and without the federated adapter.

SmolLM2-135M-Instruct, 2 threads, greedy. Each variant runs in its own process (its own peak
RSS) and reports: decode tokens/s (128 new tokens, median of 5), prompt tokens/s (a ~250-token
prompt, median of 5), peak RSS, and held-out perplexity over the response tokens of 32
held-out examples (8 per demo topic), as a ratio to the float32 PyTorch model with the same
adapter (or none). The adapter is the demo's final federated adapter (``make demo`` first).

Variants: PyTorch float32 and bfloat16 (transformers + peft); our export (``client/export.py``:
the device's own 4-bit codes) with and without the adapter; onnxruntime-genai's own INT4
build (symmetric, re-quantized from the float weights) as the off-the-shelf reference; llama.cpp
(llama-cpp-python, the ``bench`` extra) on the shipped Q4_1 GGUF and a Q4_0 re-quantization, the
adapter applied at runtime as a GGUF LoRA adapter (``simulations/bench/llamacpp.py``).

Run one variant alone: ``python -m simulations.bench.inference VARIANT``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations.bench import Table, peak_rss, register, run_child

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "simulations" / "data" / "wordnet"
TOPICS = ("noun.animal", "noun.food", "noun.artifact", "verb.motion")
ADAPTER = ROOT / "outputs" / "demo" / "adapter"
TRUST = ROOT / ".fleetlora" / "keys" / "server.key.pub"
THREADS, NEW_TOKENS, REPEATS, PER_TOPIC = 2, 128, 5, 8
VARIANTS = (
    "pytorch-fp32", "pytorch-bf16", "onnx-int4", "onnx-int4-adapter", "onnx-int4-adapter-out4", "genai-int4-builder",
    "llamacpp-q4_0", "llamacpp-q4_0-lora", "llamacpp-q4_1-lora",
)  # fmt: skip
LABELS = {
    "pytorch-fp32": "PyTorch float32 + adapter",
    "pytorch-bf16": "PyTorch bfloat16 + adapter",
    "onnx-int4": "ONNX INT4 (ours), no adapter",
    "onnx-int4-adapter": "ONNX INT4 (ours) + federated adapter",
    "onnx-int4-adapter-out4": "ONNX INT4 (ours, output layer re-quantized to 4 bits) + federated adapter",
    "genai-int4-builder": "ONNX INT4 (onnxruntime-genai builder, re-quantized), no adapter",
    "llamacpp-q4_0": "llama.cpp Q4_0 (re-quantized from Q4_1), no adapter",
    "llamacpp-q4_0-lora": "llama.cpp Q4_0 (re-quantized from Q4_1) + federated adapter (runtime LoRA)",
    "llamacpp-q4_1-lora": "llama.cpp Q4_1 (the shipped GGUF) + federated adapter (runtime LoRA)",
}


def _examples(tok: Any) -> list[Any]:
    from shared.data import encode, load_jsonl

    return [encode(e, tok, 256) for t in TOPICS for e in load_jsonl(DATA / t / "heldout.jsonl")[:PER_TOPIC]]


def _prompt_ids(tok: Any) -> tuple[list[int], list[int]]:
    """Return a short chat prompt (decode) and a ~250-token one (prompt throughput)."""
    from shared.data import load_jsonl

    short = tok.apply_chat_template([{"role": "user", "content": "Define 'otter'."}], add_generation_prompt=True)
    answers = [e.messages[-1][1] for e in load_jsonl(DATA / TOPICS[0] / "heldout.jsonl")[:24]]
    text = "Which of these describe animals? " + " ".join(answers)
    long = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return [list(x["input_ids"] if hasattr(x, "keys") else x) for x in (short, long)]  # type: ignore[return-value]


def _ppl(nll: list[float], count: list[int]) -> float:
    return math.exp(sum(nll) / sum(count))


def _response_nll(logits: torch.Tensor, labels: list[int]) -> tuple[float, int]:
    """Return the summed NLL of the labelled (response) tokens and their count; logits (S, V)."""
    target = torch.tensor(labels[1:])
    mask = target != -100
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return float(-lp[mask, target[mask]].sum()), int(mask.sum())


def measure_pytorch(dtype: torch.dtype) -> dict[str, Any]:
    """Float model (+ the demo adapter via peft): decode and prompt speed, peak RSS, held-out NLL with and without."""
    from peft import PeftModel

    from shared.model import load_model, load_tokenizer

    torch.set_num_threads(THREADS)
    tok = load_tokenizer("smollm2-135m-instruct")
    model = PeftModel.from_pretrained(load_model("smollm2-135m-instruct", dtype), str(ADAPTER)).eval()
    short, long = _prompt_ids(tok)
    new = NEW_TOKENS if dtype == torch.float32 else 16  # bf16 is emulated on AVX2-only CPUs: slow
    decode, prompt = [], []
    with torch.no_grad():
        for _ in range(REPEATS if dtype == torch.float32 else 1):
            t0 = time.perf_counter()
            model(torch.tensor([long]))
            prompt.append(len(long) / (time.perf_counter() - t0))
            ids = torch.tensor([short])
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            decode.append((out.shape[1] - len(short)) / (time.perf_counter() - t0))
        rss = peak_rss() / 2**20
        result: dict[str, Any] = {"decode": statistics.median(decode), "prompt": statistics.median(prompt), "rss": rss}
        for key, ctx in (("adapter", None), ("base", model.disable_adapter)):
            nll, n = [], []
            for e in _examples(tok):
                if ctx is None:
                    logits = model(torch.tensor([e.input_ids])).logits[0]
                else:
                    with ctx():
                        logits = model(torch.tensor([e.input_ids])).logits[0]
                a, b = _response_nll(logits, e.labels)
                nll.append(a)
                n.append(b)
            result[f"ppl_{key}"] = _ppl(nll, n)
    return result


def _onnx_nll(folder: Path, tok: Any, lora: dict[str, np.ndarray] | None) -> float:
    """Held-out perplexity through a plain ONNX Runtime session (full sequence, empty KV cache)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    past = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_size"]), dtype=np.float32)
    nll, count = [], []
    for e in _examples(tok):
        feed: dict[str, Any] = {"input_ids": np.array([e.input_ids], np.int64)}
        feed["attention_mask"] = np.ones_like(feed["input_ids"])
        for i in range(cfg["num_hidden_layers"]):
            feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = past
        feed.update(lora or {})
        logits = sess.run(["logits"], feed)[0][0]
        a, b = _response_nll(torch.from_numpy(logits), e.labels)
        nll.append(a)
        count.append(b)
    return _ppl(nll, count)


def measure_onnx(variant: str) -> dict[str, Any]:
    """Our export (or the builder's own INT4 model): decode and prompt speed via onnxruntime-genai, RSS, perplexity."""
    import onnxruntime_genai as og

    from client.export import ExportOptions
    from client.infer import EdgeModel
    from client.onnx_adapter import lora_scale, onnx_lora_tensors, read_corrections
    from shared.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from shared.model import load_tokenizer
    from shared.sign import TrustList
    from shared.tensors import load_arrays

    tok = load_tokenizer("smollm2-135m-instruct")
    adapter = variant.startswith("onnx-int4-adapter")
    options = ExportOptions(output_bits=4 if variant.endswith("out4") else 8)
    lora = None
    if variant == "genai-int4-builder":
        folder = _builder_int4()
        model = og.Model(_threads(og, folder))
        adapters, name = None, ""
    else:
        edge = EdgeModel(_base_release(), TrustList.load(TRUST), _cache(), threads=THREADS, options=options)
        folder, model = edge.folder, edge.model
        adapters = edge.adapters
        if adapter:
            release = _demo_release()
            edge.apply_release(release)
            assert edge.active is not None
            files = {n: (release / n).read_bytes() for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}  # what was applied
            lora = onnx_lora_tensors(
                load_arrays(files[ADAPTER_WEIGHTS]),  # as the device parses it (numpy)
                lora_scale(files[ADAPTER_CONFIG]),
                edge.lora_layers,
                read_corrections(edge.folder),
            )
        name = edge.adapter_name(adapter)  # the active adapter, or the base alone (its own adapter)
    short, long = _prompt_ids(tok)
    decode: list[float] = []
    prompt: list[float] = []
    for _ in range(REPEATS):
        for ids, sink in ((long, prompt), (short, decode)):
            params = og.GeneratorParams(model)
            n = NEW_TOKENS if sink is decode else 1
            params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
            gen = og.Generator(model, params)
            if adapters is not None:
                gen.set_active_adapter(adapters, name)  # our export: an adapter is always active
            t0 = time.perf_counter()
            gen.append_tokens(ids)
            if sink is prompt:
                prompt.append(len(ids) / (time.perf_counter() - t0))
                continue
            t0, k = time.perf_counter(), 0
            while not gen.is_done():
                gen.generate_next_token()
                k += 1
            decode.append(k / (time.perf_counter() - t0))
    rss = peak_rss() / 2**20
    ppl = _onnx_nll(folder, tok, lora)
    size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    return {
        "decode": statistics.median(decode),
        "prompt": statistics.median(prompt),
        "rss": rss,
        "ppl": ppl,
        "bytes": size,
    }


def _threads(og: Any, folder: Path) -> Any:
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}))
    return config


def _cache() -> Path:
    from shared.model import cache_dir

    return cache_dir() / "bench"


def _base_release() -> Path:
    """Return the demo's signed 4-bit base (what every device downloaded)."""
    base = ROOT / "outputs" / "store" / "base"
    if not (base / "manifest.json").is_file() or not ADAPTER.is_dir():
        raise SystemExit("run `make demo` first: this benchmark serves its signed base and final adapter")
    return base


def _demo_release() -> Path:
    """Return the demo run's final signed release: the one its PEFT folder ``ADAPTER`` was saved from."""
    from shared.release import follow_latest

    run = json.loads((ADAPTER.parent / "rounds.json").read_text())["run"]
    return follow_latest(Path(run["releases"]))


def _builder_int4() -> Path:
    """onnxruntime-genai's own INT4 CPU model of the float reference (cached)."""
    import subprocess

    from shared.model import resolve_model

    out = _cache() / "genai-int4"
    if not (out / "model.onnx").is_file():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", resolve_model("smollm2-135m-instruct")]
        cmd += ["-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(_cache() / "hf")]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


@register("inference")
def bench() -> Table:
    """All variants side by side, each in its own process."""
    from client.export import ExportOptions, export_base
    from simulations.bench.llamacpp import check_lora

    for bits in (8, 4):  # once, before the timed processes (in a child process of its own)
        export_base(_base_release(), _cache(), ExportOptions(output_bits=bits))
    _builder_int4()
    run_child("simulations.bench.llamacpp", "prepare")  # the GGUFs: Q4_0 quantization, adapter conversion
    load_before = os.getloadavg()[0]
    res = {v: run_child("simulations.bench.inference", v) for v in VARIANTS}
    load_after = os.getloadavg()[0]
    llama = res["llamacpp-q4_0-lora"]
    fp32 = res["pytorch-fp32"]
    check_lora(res, fp32["ppl_adapter"])
    table = Table(
        "On-device inference: PyTorch vs ONNX Runtime INT4 vs llama.cpp, with the federated adapter",
        "python -m simulations.bench --only inference",
        [
            "variant",
            "decode tok/s",
            "× PyTorch fp32",
            "prompt tok/s",
            "peak RSS MB",
            "held-out ppl",
            "× float ppl",
            "model MB",
        ],
    )
    for v in VARIANTS:
        r = res[v]
        with_adapter = "adapter" in v or v.endswith("-lora") or v.startswith("pytorch")
        ppl = r.get("ppl", r.get("ppl_adapter"))
        ref = fp32["ppl_adapter"] if with_adapter else fp32["ppl_base"]
        size = r.get("bytes")
        table.rows.append([
            LABELS[v], f"{r['decode']:.1f}", f"{r['decode'] / fp32['decode']:.2f}", f"{r['prompt']:.0f}",
            f"{r['rss']:.0f}", f"{ppl:.4f}", f"{ppl / ref:.4f}", "-" if size is None else f"{size / 1e6:.1f}",
        ])  # fmt: skip
    table.rows.append(
        ["PyTorch float32, no adapter (reference)", "-", "-", "-", "-", f"{fp32['ppl_base']:.4f}", "1.0000", "538.1"]
    )
    table.notes += [
        f"{THREADS} threads; decode: {NEW_TOKENS} new tokens after a 35-token chat prompt (bf16: 16 tokens, 1 run);"
        " prompt: one ~250-token prompt; medians of 5.",
        "held-out ppl: exp(mean NLL) over the response tokens of 32 held-out examples (8 per demo topic); "
        "'× float ppl' divides by PyTorch float32 with the same adapter (or none).",
        "ours = the device's own 4-bit codes (the ones it trained on), block-sum correction for the min, "
        "8-bit embedding/output layer; int8 activations (MatMulNBits accuracy level 4).",
        f"llama.cpp: llama-cpp-python {llama['version']} built from source (default CMake flags: GGML_NATIVE, "
        f"OpenMP; CPU features: {llama['cpu_features']}); Q4_0 is re-quantized from the shipped Q4_1 by "
        "llama.cpp's quantizer (allow_requantize; embeddings stay Q8_0), not from float weights; the adapter is a "
        f"{llama['adapter_bytes'] / 1e6:.1f} MB F32 GGUF (simulations/bench/gguf_lora.py) applied at runtime, "
        "and the base is read into memory (llama-cpp-python turns mmap off with a LoRA).",
        f"1-minute load average {load_before:.1f} before, {load_after:.1f} after (2 cores): speeds are only "
        "comparable when it stayed below ~2.",
    ]
    return table


def main(argv: list[str]) -> None:
    """Measure one variant and print its JSON (what :func:`bench` reads)."""
    variant = argv[0]
    if variant.startswith("pytorch"):
        result = measure_pytorch(torch.float32 if variant == "pytorch-fp32" else torch.bfloat16)
    elif variant.startswith("llamacpp"):
        from simulations.bench.llamacpp import measure_llamacpp

        result = measure_llamacpp(variant)
    else:
        result = measure_onnx(variant)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
