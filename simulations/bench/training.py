"""Training memory and time per step on the 4-bit base: today's default, the new default, the <= 1 GB configuration.

The int4 benchmark's setting (SmolLM2-135M 4-bit base, packed noun.food sequences of 256 tokens,
batch 4, LoRA r = 8 on all linear layers), at ``train.dtype = auto`` (bf16 where the CPU has
native bf16, fp32 elsewhere). Each variant trains ``STEPS`` steps in its own process (its own
peak RSS, its held-out loss). Time per step is measured apart, in one process that alternates the
variants step by step on one model (``TIMED`` steps each): this VM's speed drifts by 10-15%
between processes minutes apart (measured), which a ratio of separate processes would carry.

"today's default" runs the code paths before issue 18's training change in the same tree: peft
casting every LoRA input to fp32 (no autocast) and the output layer's logits for every
response token at once (plain cross-entropy). "plain recomputation" checkpoints as before
``client/checkpointing.py`` trimmed the recomputation (attention and the down projection recomputed).

Run one variant alone: ``python -m simulations.bench.training VARIANT STEPS DTYPE`` (DTYPE: ``auto`` or
``float32``; VARIANT ``timed``: the alternating timing process).
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

from simulations.bench import Table, peak_rss, register, run_child, trainer_env

STEPS, TIMED = 20, 12
GLIBC = ("new default", "<= 1 GB: new default + train.gradient-checkpointing = 1")
"""Variants measured again on glibc's malloc (every row else runs on mimalloc, as a device's training process)."""
VARIANTS = {  # name: (code: "before" issue 18, "plain" recomputation, "now"; gradient checkpointing)
    "today's default (before)": ("before", 0),
    "new default": ("now", 0),
    "<= 1 GB, plain recomputation (before client/checkpointing.py)": ("plain", 1),
    "<= 1 GB: new default + train.gradient-checkpointing = 1": ("now", 1),
}


@contextlib.contextmanager
def _code(code: str) -> Any:
    """Within the block, train with the paths issue 18 replaced ("before"), a plain recomputation ("plain") or now's."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import client.checkpointing
    import client.train

    def plain(lm_head: Any, hidden: Any, targets: Any) -> Any:
        return torch.nn.functional.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")

    saved = client.train.output_nll, client.train.lora_in_compute_dtype
    trims = client.checkpointing._DISCARDABLE, client.checkpointing._attention
    if code == "before":
        client.train.output_nll = plain
        client.train.lora_in_compute_dtype = lambda model: (contextlib.nullcontext(), contextlib.nullcontext)
    if code == "plain":  # no kept attention output, no skipped down projection (W is still kept)
        client.checkpointing._DISCARDABLE, client.checkpointing._attention = {}, sdpa_attention_forward
    try:
        yield
    finally:
        client.train.output_nll, client.train.lora_in_compute_dtype = saved
        client.checkpointing._DISCARDABLE, client.checkpointing._attention = trims


def _setup(dtype: str) -> tuple[Any, Any, list[Any], Any]:
    """Return the 4-bit base with LoRA r = 8 at train.dtype ``dtype``, its tokenizer, the packed data, a config."""
    from shared.adapter import attach_lora
    from shared.config import LoraConfig, TrainConfig
    from shared.model import compute_dtype, load_model, load_tokenizer
    from simulations.bench.int4 import BATCH, SEQ, _int4_dir, _packed

    spec = str(_int4_dir())
    tok = load_tokenizer(spec)
    model = attach_lora(load_model(spec, compute_dtype(dtype)), LoraConfig(rank=8, alpha=16), seed=0)
    return model, tok, _packed(tok), TrainConfig(steps=1, batch_size=BATCH, lr=1e-3, max_seq_len=SEQ)


def timed(steps: int, dtype: str) -> dict[str, list[float]]:
    """One process: every variant's training step in turn, ``steps`` times; seconds of each step by variant."""
    from client.train import train_adapter

    model, tok, data, cfg = _setup(dtype)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for step in range(steps + 1):  # the first round warms up
        for name, (code, checkpointing) in VARIANTS.items():
            with _code(code):
                t0 = time.perf_counter()
                train_adapter(model, data, replace(cfg, gradient_checkpointing=checkpointing), tok.pad_token_id, step)
                if step:
                    times[name].append(time.perf_counter() - t0)
    return times


def measure(variant: str, steps: int, dtype: str) -> dict[str, float]:
    """Train ``steps`` steps of one variant; report seconds per step, peak RSS, held-out loss."""
    from client.train import evaluate, train_adapter
    from shared.config import EvalConfig
    from shared.data import encode, load_jsonl
    from simulations.bench.int4 import DATA, SEQ

    code, checkpointing = VARIANTS[variant]
    model, tok, data, cfg = _setup(dtype)
    heldout = [encode(e, tok, SEQ) for e in load_jsonl(DATA / "heldout.jsonl")[:64]]
    times = []
    with _code(code):
        for step in range(steps):
            t0 = time.perf_counter()
            train_adapter(model, data, replace(cfg, gradient_checkpointing=checkpointing), tok.pad_token_id, step)
            times.append(time.perf_counter() - t0)
    rss = peak_rss()  # before evaluation: the training process's peak
    loss = evaluate(model, heldout, EvalConfig(max_examples=64, batch_size=16), tok.pad_token_id).loss
    return {"s_per_step": statistics.median(times[1:]), "peak_rss": rss, "heldout": loss}


@register("training")
def training() -> Table:
    """Alternate the variants in fresh processes; medians of s / step, peak RSS, held-out loss."""
    from shared.model import compute_dtype_name

    load_before = os.getloadavg()[0]
    auto = compute_dtype_name("auto")
    dtypes = {"auto": auto} | ({"float32": "float32"} if auto != "float32" else {})  # fp32 CPUs' rows too
    table = Table(
        title="Training memory and time: today's default, the new default, <= 1 GB (SmolLM2-135M 4-bit, "
        "seq 256, batch 4, r=8)",
        command="python -m simulations.bench --only training",
        header=[
            "configuration",
            "compute",
            "s / step (median, alternating)",
            "x today",
            f"s / step alone ({STEPS} steps)",
            "peak RSS (MB)",
            f"held-out loss after {STEPS} steps",
        ],
    )
    device, glibc = trainer_env(), trainer_env("glibc")
    for dtype, shown in dtypes.items():
        runs = {name: run_child("simulations.bench.training", name, str(STEPS), dtype, env=device) for name in VARIANTS}
        runs |= {f"{name}, glibc malloc": run_child("simulations.bench.training", name, str(STEPS), dtype, env=glibc)
                 for name in GLIBC}  # fmt: skip
        times = run_child("simulations.bench.training", "timed", str(TIMED), dtype, env=device)
        ref = statistics.median(times["today's default (before)"])
        for name, r in runs.items():
            s = statistics.median(times[name]) if name in times else None
            table.rows.append([
                name, f"{shown} (train.dtype = {dtype})", f"{s:.2f}" if s else "-", f"{s / ref:.2f}" if s else "-",
                f"{r['s_per_step']:.2f}", f"{r['peak_rss'] / 1e6:,.0f}", f"{r['heldout']:.4f}",
            ])  # fmt: skip
    table.notes = [
        f"train.dtype = auto computes in {auto} on this CPU; the float32 rows (where auto is bf16) show what a CPU "
        "without native bf16 gets from the change (a CPU that emulates bf16 computes in float32); x today: against "
        "today's default in the same compute dtype; s / step (median, alternating): one process per dtype, the "
        f"variants' steps in turn on one model, {TIMED} steps each after a warm-up round; s / step alone, peak "
        "RSS (VmHWM, MB = 10^6 bytes, taken before evaluation) and held-out loss: each variant in its own fresh "
        f"process, {STEPS} steps (median of the steps after the first); the process holds Python, torch, "
        "transformers, the tokenizer, the model and the data",
        "new default: LoRA branches in the base's compute dtype under torch.autocast with peft's fp32 cast of their "
        "inputs off (client.train.lora_in_compute_dtype; no change on an fp32 CPU), and the output layer + "
        "cross-entropy in chunks of 32 response tokens with its gradient taken in the forward pass (client/loss.py)",
        "<= 1 GB: the same + activation checkpointing of every decoder layer (client/checkpointing.py): the 4-bit "
        "layers' dequantized weights kept from the recomputation for the backward pass, each layer's attention "
        "output and log-sum-exp kept from the first pass for the recomputation (not recomputed), the MLP's down "
        "projection not multiplied in the recomputation (its value is never read); plain recomputation: the same "
        "without the last two",
        "allocator: every process runs on mimalloc, as a device's training process does (server/processes.py: "
        f"{device.get('LD_PRELOAD', 'not installed: glibc')}); the rows marked glibc malloc run the same variant "
        "on glibc's, in a process of their own (their time: alone only)",
        "held-out: noun.food heldout.jsonl, first 64 examples, cross-entropy per response token",
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores)",
    ]
    return table


if __name__ == "__main__":
    what, n, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps(timed(n, dtype) if what == "timed" else measure(what, n, dtype)))
