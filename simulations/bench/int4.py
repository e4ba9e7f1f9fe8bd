"""Training on the 4-bit base vs the float base, the base artifact's size, and what a device downloads.

SmolLM2-135M, sequences of 256 tokens (WordNet noun.food examples packed end to end), batch 4,
LoRA r=8 on all seven linear kinds. Each variant runs in its own process (its own peak RSS):

* float32 base and bfloat16 base (``transformers`` weights, LoRA by peft);
* our 4-bit base (``server/quantize.py``; frozen ``Int4Linear`` layers), whole batch, and with
  micro-batches of 1 plus gradient checkpointing.

Then: the bytes of the base as fp32 / bf16 / our artifact, and the bytes a device downloads
from the artifact service on its first and its second run (real gRPC on loopback).

Run one variant alone: ``python -m simulations.bench.int4 VARIANT STEPS``.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from simulations.bench import Table, peak_rss, register, run_child

DATA = Path(__file__).resolve().parents[1] / "data" / "wordnet" / "noun.food"
SEQ, BATCH, STEPS = 256, 4, 20
VARIANTS = {  # name: (base, dtype, micro-batch, checkpointing, steps)
    "float32 base": ("float", "float32", 0, 0, STEPS),
    "bfloat16 base": ("float", "bfloat16", 0, 0, 2),  # emulated bf16 on AVX2-only CPUs: timing only
    "4-bit base": ("int4", "float32", 0, 0, STEPS),
    "4-bit base, micro-batch 1 + checkpointing": ("int4", "float32", 1, 1, STEPS),
}


def _int4_dir() -> Path:
    from server.quantize import quantize_model
    from shared.model import cache_dir, model_digest, resolve_model

    out = cache_dir() / "bench" / "smollm2-int4"
    if not (out / "quantization.json").is_file():
        quantize_model(resolve_model("smollm2-135m-instruct"), out, model_digest("smollm2-135m-instruct"))
    return out


def _packed(tok: Any) -> list[Any]:
    """Training examples concatenated into sequences of exactly SEQ tokens (labels on responses)."""
    from shared.data import Encoded, encode, load_jsonl

    ids: list[int] = []
    labels: list[int] = []
    for ex in load_jsonl(DATA / "train.jsonl"):
        e = encode(ex, tok, SEQ)
        ids += e.input_ids
        labels += e.labels
    return [Encoded(ids[i : i + SEQ], labels[i : i + SEQ]) for i in range(0, len(ids) - SEQ, SEQ)]


def measure(variant: str, steps: int) -> dict[str, float]:
    """Train ``steps`` steps of one variant; report seconds per step, peak RSS, held-out loss."""
    from client.train import evaluate, train_adapter
    from shared.adapter import attach_lora
    from shared.config import EvalConfig, LoraConfig, TrainConfig
    from shared.data import encode, load_jsonl
    from shared.model import load_model, load_tokenizer

    base, dtype, micro, ckpt, _ = VARIANTS[variant]
    spec = str(_int4_dir()) if base == "int4" else "smollm2-135m-instruct"
    tok = load_tokenizer(spec)
    data = _packed(tok)
    heldout = [encode(e, tok, SEQ) for e in load_jsonl(DATA / "heldout.jsonl")[:64]]
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = attach_lora(load_model(spec, torch_dtype), LoraConfig(rank=8, alpha=16), seed=0)
    cfg = TrainConfig(steps=1, batch_size=BATCH, lr=1e-3, max_seq_len=SEQ, micro_batch_size=micro,
                      gradient_checkpointing=ckpt)  # fmt: skip
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        train_adapter(model, data, replace(cfg, steps=1), tok.pad_token_id, seed=step)
        times.append(time.perf_counter() - t0)
    loss = evaluate(model, heldout, EvalConfig(max_examples=64, batch_size=16), tok.pad_token_id).loss
    return {
        "s_per_step": statistics.median(times[1:] or times),
        "peak_rss": peak_rss(),
        "heldout": loss,
        "steps": steps,
    }


def _downloads() -> tuple[int, int, int]:
    """Serve the 4-bit base on loopback, fetch it twice into one cache: (artifact bytes, first, second)."""
    from client.fetch import fetch_release
    from server.distribute import serve
    from server.quantize import publish_base
    from shared.model import model_digest, resolve_model
    from shared.sign import TrustList, generate_key

    with tempfile.TemporaryDirectory() as tmp:
        key = generate_key(Path(tmp) / "k.key")
        trust = TrustList.load(Path(tmp) / "k.key.pub")
        src = resolve_model("smollm2-135m-instruct")
        release, _ = publish_base(src, model_digest("smollm2-135m-instruct"), Path(tmp) / "store", key)
        server, port = serve(Path(tmp) / "store")
        try:
            first = fetch_release(f"127.0.0.1:{port}", "base", Path(tmp) / "cache", trust).bytes_downloaded
            second = fetch_release(f"127.0.0.1:{port}", "base", Path(tmp) / "cache", trust).bytes_downloaded
        finally:
            server.stop(None)
        return sum(len(b) for b in release.files.values()), first, second


@register("int4")
def int4() -> list[Table]:
    """Run each variant in its own process, then the artifact and download figures."""
    train = Table(
        title=f"Training on the 4-bit base (SmolLM2-135M, seq {SEQ}, batch {BATCH}, LoRA r=8 all linear)",
        command="python -m simulations.bench --only int4",
        header=["base", "s / step", "x float32", "peak RSS (MB)", f"held-out loss after {STEPS} steps"],
    )
    from shared.model import compute_dtype

    results = {}
    for name, (*_, steps) in VARIANTS.items():
        if "bfloat16" in name and compute_dtype("auto") != torch.bfloat16:
            continue  # emulated bf16 (AVX2-only CPUs) did not finish 2 steps in 6 min: see BENCHMARKS.md
        results[name] = run_child("simulations.bench.int4", name, str(steps))
        print(name, results[name], flush=True)
    ref = results["float32 base"]["s_per_step"]
    for name, r in results.items():
        loss = f"{r['heldout']:.4f}" if r["steps"] == STEPS else f"- (timing only, {r['steps']} steps)"
        train.rows.append(
            [name, f"{r['s_per_step']:.2f}", f"{r['s_per_step'] / ref:.2f}", f"{r['peak_rss'] / 1e6:.0f}", loss]
        )
    train.notes = [
        "s / step: median over the steps after the first; peak RSS: the whole process (Python, torch, model, data)",
        (
            "this CPU computes bfloat16 natively (AVX512-BF16 / AMX): train.dtype=auto takes bf16 here"
            if compute_dtype("auto") == torch.bfloat16
            else "this CPU emulates bfloat16 (no AVX512-BF16 / AMX): it is far slower than float32 here, so the "
            "bf16 row is skipped, and float32 is the compute dtype of the 4-bit layers (they dequantize to the "
            "input's dtype)"
        ),
        "held-out: noun.food heldout.jsonl, first 64 examples, cross-entropy per response token",
    ]
    artifact, first, second = _downloads()
    sizes = Table(
        title="Base model bytes: artifact and downloads",
        command="python -m simulations.bench --only int4",
        header=["what", "bytes", "MB"],
    )
    fp32 = sum(p.stat().st_size for p in Path(_float_dir()).glob("*.safetensors"))
    for what, n in [
        ("fp32 safetensors (the float reference)", fp32),
        ("bf16 safetensors (fp32 / 2)", fp32 // 2),
        ("our 4-bit artifact (weights + tokenizer + configs)", artifact),
        ("downloaded by a device, first run", first),
        ("downloaded by a device, second run", second),
    ]:
        sizes.rows.append([what, f"{n:,}", f"{n / 1e6:.1f}"])
    sizes.notes = ["downloads: `client/fetch.py` against the artifact service (gRPC, loopback), one device cache"]
    return [train, sizes]


def _float_dir() -> str:
    from shared.model import resolve_model

    return resolve_model("smollm2-135m-instruct")


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
