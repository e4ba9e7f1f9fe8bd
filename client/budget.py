"""A device's memory budget: the fastest rank, micro-batch and checkpointing whose training fits it.

Node config ``memory-budget-mb`` = M bounds the peak resident memory (RSS) of the process that
trains on the device: the interpreter, torch, transformers and Flower's client app, the base
model, the LoRA factors with their gradients and AdamW state, and the activations of one
micro-batch. :func:`plan` estimates that peak for each candidate setting with a footprint model
and takes the first that fits, fastest first:

1. the run's rank, micro-batches of B, B/2, ..., 1 examples without checkpointing (micro-batching
   gives the same update; it costs the parallelism of a batch and, at 1, the shared prefix);
2. the same micro-batches with gradient checkpointing (``client/checkpointing.py``: a trimmed
   recomputation of every block);
3. a lower rank (r - 1, ..., 1) with the first of those settings that fits: rank is given up last,
   as it changes what the device learns.

Where the device computes in bfloat16 (``train.dtype`` = auto on a CPU with native bf16, or
bfloat16), checkpointing at micro-batches of 2 or more comes before micro-batch 1 without it:
measured on SmolLM2 at seq 256 x batch 4 (AMD EPYC Zen 4), s / step 3.05 (micro-batch 4), 3.47 (2),
3.73 (4 + checkpointing), 4.50 (2 + checkpointing), 4.49 (1), 6.19 (1 + checkpointing); at seq 128,
2 + checkpointing is faster than 1 (3.02 vs 3.13). In float32 micro-batch 1 is faster than
checkpointing (5.4 vs 5.9 s at seq 256).

Footprint model, in bytes, for a model of L layers, hidden size H, vocabulary V, a micro-batch
of m examples of S = ``train.max-seq-len`` tokens (the worst case: every example that long and
every position labelled; real examples are shorter and score only their response)::

    peak = PROCESS + WEIGHTS * weights + 4 * STATE * (LoRA parameters at rank r) + activations
    activations = 4 * S * (m + 1) * ACT * L * H + logits                  without checkpointing
                = EXTRA + 4 * S * m * (KEEP * L + ACT) * H + logits       with checkpointing
    logits      = 4 * LOGITS * V * min(CHUNK, m * S)    (client/loss.py: CHUNK tokens' logits at a time)
    fits  <=>  peak * (1 + MARGIN) <= M * 10**6

STATE, ACT, KEEP and EXTRA depend on the compute dtype (:data:`FITS`); the rest is shared.
``weights`` counts the base as loaded: 4-bit linear layers at 0.625 bytes per weight, float
ones at 4, the embedding (and an untied output layer) in the compute dtype. The float32
coefficients were fitted to peak RSS measured on SmolLM2-135M (4-bit base, 30 layers, H 576) and a
2-layer llama of hidden size 64 (float base, SmolLM2's vocabulary), at S = 16, 128 and 256, m = 1,
2, 4, ranks 1 and 8, each run in its own process (``python -m simulations.bench.budget``); the
bfloat16 ones to SmolLM2 at S = 128 and 256, m = 1, 2, 4, with and without checkpointing, ranks 8
and 1 (every estimate 0-17% above its measurement; see :data:`FITS`), all on glibc's malloc. A device's
training process runs on mimalloc (``server/processes.py``): 8-38% lower peaks at seq 256 x batch 4,
but up to 53 MB higher for the small checkpointed settings of the budget benchmark, still within every
budget there (800 MB: 786 and 789 measured in two runs, against an estimate of 795 with the margin).
Not counted: evaluation of
the global adapter (same process, no gradients, ``eval.batch-size`` examples per forward pass; not
measured against the budget), and a simulation's Ray actor (Ray's own imports).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.device import DeviceConfigError, node_integer
from client.loss import CHUNK
from shared.files import read_bounded
from shared.int4_layer import is_int4_folder
from shared.model import ModelError, resolve_model

BUDGET_KEY = "memory-budget-mb"
MAX_BUDGET_MB = 1 << 20  # 1 TiB: larger is a typo, not a device
MB = 10**6  # the budget counts decimal megabytes, as the benchmarks print them

PROCESS = 470 * MB
"""Interpreter, torch, transformers, peft, Flower's client app, tokenizer and allocator caches (the
2-layer model's peak less its weights: 483 MB measured with 13 MB of weights)."""
WEIGHTS = 1.3
"""Peak resident bytes per byte of loaded weights: loading holds the file's tensors and their float copies."""


@dataclass(frozen=True)
class Fit:
    """The footprint model's coefficients for one compute dtype."""

    calibration: str
    """Where and when they were measured."""
    state: float
    """Float32 values per LoRA parameter: its value, gradient and AdamW's two moments, and what the LoRA path
    keeps besides."""
    act: float
    """Float32 values per token, layer and hidden unit that a block keeps for its backward pass; without
    checkpointing one example's worth more than the micro-batch stays resident."""
    keep: float
    """Float32 values per token, layer and hidden unit kept under checkpointing."""
    extra: int
    """Bytes more under checkpointing whatever the micro-batch."""
    embedding: int
    """Bytes per embedding value as loaded."""
    checkpoint_early: bool
    """Checkpointing at micro-batches >= 2 is faster than micro-batch 1 without it (tried first)."""


FITS = {
    "float32": Fit(
        calibration="Intel Xeon @ 2.80GHz (AVX-512, bf16 emulated), 2 cores, 2026-12-01",
        state=18,  # 155 MB measured between ranks 8 and 1 on SmolLM2 (2.1M parameters): peft's fp32 input casts
        act=30,  # SmolLM2: 1,465 / 1,805 MB measured at micro-batch 1 / 2, seq 128
        keep=13,  # 12 fitted (SmolLM2: 1,062 / 1,613 MB at micro-batch 1 / 4, seq 128), + 1 for the attention
        # output each layer's first pass keeps for the recomputation since (client/checkpointing.py)
        extra=0,
        embedding=4,
        checkpoint_early=False,
    ),
    "bfloat16": Fit(
        calibration="AMD EPYC Zen 4 (AVX512-BF16), 2 cores, 2026-12-06",
        state=4,  # 26 MB measured between ranks 8 and 1 (seq 128, micro-batch 1, checkpointing)
        act=14.5,  # SmolLM2 without checkpointing: 912 / 1,070 / 1,222 MB at seq 128, 1,026 / 1,358 / 1,747 at 256
        keep=2.4,  # with it: 745 / 772 / 809 MB at seq 128, 782 / 825 / 905 at 256 (micro-batch 1 / 2 / 4)
        extra=42 * MB,
        embedding=2,
        checkpoint_early=True,
    ),
}
"""Per compute dtype (``shared.model.compute_dtype_name`` of ``train.dtype``)."""
LOGITS = 3.2
"""Float32 values per token and vocabulary entry: the logits, their log-softmax and its gradient (the
2-layer model: 0.61 MB per token measured, 49,152 entries, when every token's logits were made at
once). The output layer now makes them for ``client.loss.CHUNK`` tokens at a time: the term is
bounded by that chunk (the 2-layer model at seq 6144, batch 4: ~1,015 MB measured, 1.1 GB at seq 256
before)."""
MARGIN = 0.10
"""Head room over the estimate: peak RSS of one setting varies from run to run (SmolLM2, micro-batch 1 and
checkpointing: 1,058 to 1,148 MB measured, estimate 1,075), and other sizes than calibrated."""
INT4_BYTES = 0.625  # shared/int4_layer.py: 4-bit codes plus fp16 scale and min per block of 32


@dataclass(frozen=True)
class ModelShape:
    """What the footprint model needs of a base: its sizes from ``config.json``, and how it is stored."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int  # key/value projection width (grouped-query attention: fewer heads than the queries)
    tied: bool
    int4: bool

    @classmethod
    def of(cls, spec: str) -> ModelShape:
        """Read the shape of the base ``spec`` (a model folder) from its ``config.json``.

        Raises
        ------
        DeviceConfigError
            The base is not a folder with a readable llama-style ``config.json``.
        """
        try:
            folder = Path(resolve_model(spec))
            raw = json.loads(read_bounded(folder / "config.json", 1 << 20))
            sizes = {k: raw[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")}
            heads = raw.get("num_attention_heads", 1)
            kv_heads = raw.get("num_key_value_heads", heads)
            sizes["kv"] = raw.get("head_dim", raw["hidden_size"] // heads) * kv_heads
        except (OSError, ValueError, RecursionError, KeyError, TypeError, ZeroDivisionError, ModelError) as exc:
            raise DeviceConfigError(
                f"device setting {BUDGET_KEY} needs the base's config.json (layers, hidden size, vocabulary): {exc}"
            ) from exc
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 24 for v in sizes.values()):
            raise DeviceConfigError(f"device setting {BUDGET_KEY}: the base's config.json has sizes out of range")
        return cls(
            layers=sizes["num_hidden_layers"],
            hidden=sizes["hidden_size"],
            intermediate=sizes["intermediate_size"],
            vocab=sizes["vocab_size"],
            kv_dim=sizes["kv"],
            tied=bool(raw.get("tie_word_embeddings", False)),
            int4=is_int4_folder(folder),
        )

    def linear_widths(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear kind of a llama block."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What a device with a memory budget trains with, and the peak its footprint model expects."""

    budget_mb: int
    rank: int
    micro_batch_size: int
    gradient_checkpointing: int
    footprint_mb: int


def parse_budget(node_config: Mapping[str, Any]) -> int | None:
    """Return the device's ``memory-budget-mb`` in [1, 2^20], or None when it sets none.

    Raises
    ------
    DeviceConfigError
        The value is not a whole number of MB in that range.
    """
    return node_integer(node_config, BUDGET_KEY, MAX_BUDGET_MB, 8, f"a whole number of MB in [1, {MAX_BUDGET_MB}]")


def footprint(shape: ModelShape, targets: tuple[str, ...], rank: int, micro: int, checkpointing: int, seq: int,
              dtype: str = "float32") -> int:  # fmt: skip
    """Return the estimated peak RSS in bytes of training at ``rank``, micro-batches of ``micro`` x ``seq`` tokens."""
    fit = FITS[dtype]
    widths = shape.linear_widths()
    linear = sum(i * o for i, o in widths.values()) * shape.layers
    embedding = shape.vocab * shape.hidden * fit.embedding * (1 if shape.tied else 2)
    weights = linear * (INT4_BYTES if shape.int4 else 4) + embedding
    lora = rank * sum(i + o for name, (i, o) in widths.items() if name in targets) * shape.layers
    logits = 4 * LOGITS * shape.vocab * min(CHUNK, micro * seq)
    if checkpointing:
        activations = fit.extra + 4 * seq * micro * (fit.keep * shape.layers + fit.act) * shape.hidden + logits
    else:
        activations = 4 * seq * (micro + 1) * fit.act * shape.layers * shape.hidden + logits
    return math.ceil(PROCESS + WEIGHTS * weights + 4 * fit.state * lora + activations)


def _micro_sizes(batch: int, run_micro: int) -> list[int]:
    """Micro-batch sizes to try, largest first: the run's (or the whole batch), then halves down to 1."""
    size = min(run_micro, batch) if run_micro else batch
    sizes = [size]
    while size > 1:
        size = math.ceil(size / 2)
        sizes.append(size)
    return sizes


def _candidates(max_rank: int, batch: int, run_micro: int, run_ckpt: int, dtype: str) -> Iterator[tuple[int, int, int]]:
    """(rank, micro-batch, checkpointing), fastest first; the rank is lowered last."""
    sizes = _micro_sizes(batch, run_micro)
    if FITS[dtype].checkpoint_early and len(sizes) > 1:
        order = [(m, 0) for m in sizes[:-1]] + [(m, 1) for m in sizes[:-1]] + [(1, 0), (1, 1)]
    else:
        order = [(m, 0) for m in sizes] + [(m, 1) for m in sizes]
    for rank in range(max_rank, 0, -1):
        for micro, ckpt in order:
            if ckpt or not run_ckpt:
                yield rank, micro, ckpt


def plan(
    budget_mb: int,
    shape: ModelShape,
    targets: tuple[str, ...],
    max_rank: int,
    batch: int,
    seq: int,
    run_micro: int = 0,
    run_ckpt: int = 0,
    dtype: str = "float32",
) -> Plan:
    """Return the fastest setting whose estimated peak fits ``budget_mb`` (see the module docstring).

    ``run_micro`` / ``run_ckpt``: the run's own ``train.micro-batch-size`` / ``train.gradient-checkpointing``,
    which a device never loosens (its micro-batches are at most the run's, checkpointing stays on).
    ``dtype``: the compute dtype, a key of :data:`FITS`.

    Raises
    ------
    DeviceConfigError
        Nothing fits: the message names the budget and the smallest footprint this device could reach.
    """
    smallest = None
    for rank, micro, ckpt in _candidates(max_rank, batch, run_micro, run_ckpt, dtype):
        need = footprint(shape, targets, rank, micro, ckpt, seq, dtype) * (1 + MARGIN)
        smallest = need if smallest is None else min(smallest, need)
        if need <= budget_mb * MB:
            return Plan(budget_mb, rank, micro, ckpt, math.ceil(need / MB))
    raise DeviceConfigError(
        f"device setting {BUDGET_KEY} = {budget_mb} MB is too small to train this run: the smallest footprint "
        f"this device can reach (rank 1, micro-batch 1, gradient checkpointing, {seq} tokens) is about "
        f"{math.ceil((smallest or 0) / MB)} MB; raise the budget or lower train.max-seq-len"
    )
