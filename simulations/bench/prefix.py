"""The shared prefix: a batch's common prompt prefix computed once per step, against the plain path.

SmolLM2-135M on its 4-bit base, LoRA r = 8 on all linear layers, the demo's own examples
(``noun.food``, SmolLM2's chat template with its default system prompt, up to 128 tokens) in
batches of 4 as ``make demo`` trains them. One process; each step (forward, backward of the
response loss through ``client.train.response_nll``) runs once with the prefix shared and once
plain, alternating, on the same batch; the table gives the medians and their ratio. Loss and
gradients are the same on both paths (``tests/client/test_train.py``).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

from simulations.bench import Table, register

DATA = Path(__file__).resolve().parents[1] / "data" / "wordnet" / "noun.food"
BATCH, SEQ, STEPS, DEMO_STEPS = 4, 128, 12, 15


@register("prefix")
def prefix() -> Table:
    """Time a training step with the common prefix shared and plain, alternating."""
    import torch

    from client.train import _common_prefix, response_nll
    from shared.adapter import attach_lora
    from shared.config import LoraConfig
    from shared.data import collate, encode, load_jsonl
    from shared.model import load_model, load_tokenizer
    from simulations.bench.int4 import _int4_dir

    load_before = os.getloadavg()[0]
    spec = str(_int4_dir())
    tok = load_tokenizer(spec)
    examples = [encode(e, tok, SEQ) for e in load_jsonl(DATA / "train.jsonl")]
    model = attach_lora(load_model(spec, torch.float32), LoraConfig(rank=8, alpha=16), seed=0)
    model.train()
    rng = random.Random(0)
    times: dict[bool, list[float]] = {True: [], False: []}
    prefixes, lengths = [], []
    for step in range(STEPS + 1):  # the first pair warms up
        batch = collate(rng.sample(examples, BATCH), tok.pad_token_id)
        prefixes.append(_common_prefix(batch["input_ids"], batch["attention_mask"]))
        lengths.append(int(batch["attention_mask"].sum()) / BATCH)
        for share in (True, False) if step % 2 else (False, True):
            t0 = time.perf_counter()
            nll, _ = response_nll(model, batch, share)
            nll.backward()
            model.zero_grad(set_to_none=True)
            if step:
                times[share].append(time.perf_counter() - t0)
    shared, plain = statistics.median(times[True]), statistics.median(times[False])
    table = Table(
        title="Shared prefix: the batch's common prompt prefix computed once (SmolLM2-135M, 4-bit base, demo data)",
        command="python -m simulations.bench --only prefix",
        header=["path", "s / step (forward + backward)", "s / client-round (15 steps)", "speedup"],
        rows=[
            ["plain (every example runs its own prefix)", f"{plain:.3f}", f"{plain * DEMO_STEPS:.1f}", "1.00x"],
            ["shared prefix", f"{shared:.3f}", f"{shared * DEMO_STEPS:.1f}", f"{plain / shared:.2f}x"],
        ],
    )
    table.notes.append(
        f"batch {BATCH}, up to {SEQ} tokens, LoRA r=8 all linear, fp32 compute; common prefix "
        f"{statistics.mean(prefixes):.1f} tokens of {statistics.mean(lengths):.1f} per example on average; "
        f"medians of {STEPS} alternating steps after a warm-up pair, optimizer step not included (it is the same)"
    )
    table.notes.append(
        "under gradient checkpointing (train.gradient-checkpointing = 1) the plain path runs: transformers keeps "
        "no key/value cache there"
    )
    table.notes.append(f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores)")
    return table
