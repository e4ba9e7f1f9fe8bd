"""Training memory and time per step on the 4-bit base: today's default, the new default, the <= 1 GB configuration.

The int4 benchmark's setting (SmolLM2-135M 4-bit base, packed noun.food sequences of 256 tokens,
batch 4, LoRA r = 8 on all linear layers), at ``train.dtype = auto`` (bf16 where the CPU has
native bf16, fp32 elsewhere). Each variant trains ``STEPS`` steps in its own process (its own
peak RSS); the variants alternate, ``ROUNDS`` processes each, and the table gives each variant's
median s / step over its processes and its largest peak RSS.

"today's default" runs the code paths before issue 18's training change in the same tree: peft
casting every LoRA input to fp32 (no autocast) and the output layer's logits for every
response token at once (plain cross-entropy).

Run one variant alone: ``python -m simulations.bench.training VARIANT STEPS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

from simulations.bench import Table, peak_rss, register, run_child

STEPS, ROUNDS = 20, 2
VARIANTS = {  # name: (code before issue 18, gradient checkpointing)
    "today's default (before)": (True, 0),
    "new default": (False, 0),
    "<= 1 GB: new default + train.gradient-checkpointing = 1": (False, 1),
}


def _use_code_before() -> None:
    """Put back the two training paths issue 18 replaced (in this process only)."""
    import torch

    import client.train

    def plain(lm_head: Any, hidden: Any, targets: Any) -> Any:
        return torch.nn.functional.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")

    client.train.output_nll = plain  # type: ignore[assignment]
    client.train.lora_in_compute_dtype = lambda model: (contextlib.nullcontext(), contextlib.nullcontext)  # type: ignore[assignment]


def measure(variant: str, steps: int) -> dict[str, float]:
    """Train ``steps`` steps of one variant; report seconds per step, peak RSS, held-out loss."""
    from client.train import evaluate, train_adapter
    from shared.adapter import attach_lora
    from shared.config import EvalConfig, LoraConfig, TrainConfig
    from shared.data import encode, load_jsonl
    from shared.model import compute_dtype, load_model, load_tokenizer
    from simulations.bench.int4 import BATCH, DATA, SEQ, _int4_dir, _packed

    before, checkpointing = VARIANTS[variant]
    if before:
        _use_code_before()
    spec = str(_int4_dir())
    tok = load_tokenizer(spec)
    data = _packed(tok)
    heldout = [encode(e, tok, SEQ) for e in load_jsonl(DATA / "heldout.jsonl")[:64]]
    model = attach_lora(load_model(spec, compute_dtype("auto")), LoraConfig(rank=8, alpha=16), seed=0)
    cfg = TrainConfig(steps=1, batch_size=BATCH, lr=1e-3, max_seq_len=SEQ, gradient_checkpointing=checkpointing)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        train_adapter(model, data, replace(cfg, steps=1), tok.pad_token_id, seed=step)
        times.append(time.perf_counter() - t0)
    rss = peak_rss()  # before evaluation: the training process's peak
    loss = evaluate(model, heldout, EvalConfig(max_examples=64, batch_size=16), tok.pad_token_id).loss
    return {"s_per_step": statistics.median(times[1:]), "peak_rss": rss, "heldout": loss}


@register("training")
def training() -> Table:
    """Alternate the variants in fresh processes; medians of s / step, peak RSS, held-out loss."""
    from shared.model import compute_dtype

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(ROUNDS):
        for name in VARIANTS:
            runs[name].append(run_child("simulations.bench.training", name, str(STEPS)))
            print(name, runs[name][-1], flush=True)
    dtype = str(compute_dtype("auto")).removeprefix("torch.")
    table = Table(
        title=f"Training memory and time: today's default, the new default, <= 1 GB (SmolLM2-135M 4-bit, "
        f"seq 256, batch 4, r=8, {dtype})",
        command="python -m simulations.bench --only training",
        header=[
            "configuration",
            "s / step (median)",
            "x today",
            "per process",
            "peak RSS (MB)",
            f"held-out loss after {STEPS} steps",
        ],  # fmt: skip
    )
    ref = statistics.median(r["s_per_step"] for r in runs["today's default (before)"])
    for name, rs in runs.items():
        s = statistics.median(r["s_per_step"] for r in rs)
        table.rows.append([
            name, f"{s:.2f}", f"{s / ref:.2f}", " / ".join(f"{r['s_per_step']:.2f}" for r in rs),
            f"{max(r['peak_rss'] for r in rs) / 1e6:,.0f}", f"{rs[0]['heldout']:.4f}",
        ])  # fmt: skip
    table.notes = [
        f"train.dtype = auto computes in {dtype} on this CPU; each variant in {ROUNDS} fresh processes, alternating, "
        f"{STEPS} steps each; s / step: median of the steps after the first, then of the processes; peak RSS "
        "(VmHWM, MB = 10^6 bytes): the training process (Python, torch, transformers, tokenizer, model, data), "
        "the largest of its processes, taken before evaluation",
        "new default: LoRA branches in the base's compute dtype under torch.autocast with peft's fp32 cast of their "
        "inputs off (client.train.lora_in_compute_dtype; no change on an fp32 CPU), and the output layer + "
        "cross-entropy in chunks of 32 response tokens with its gradient taken in the forward pass (client/loss.py)",
        "<= 1 GB: the same + activation checkpointing of every decoder layer, the 4-bit layers' dequantized weights "
        "kept from the recomputation for the backward pass (shared/int4_layer.py keep_dequantized)",
        "held-out: noun.food heldout.jsonl, first 64 examples, cross-entropy per response token",
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores)",
    ]
    return table


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
