"""Local LoRA training and held-out evaluation on a device's private data.

Pure functions over a peft model, a tokenizer and encoded examples: no Flower here, so they
are testable on their own. The base is frozen; peft keeps the LoRA factors in fp32 and
AdamW updates only those.

The loss projects hidden states through the output layer only at response positions: with a
49k vocabulary the (B, T, V) logits of every position dominate memory, and prompt positions
(system prompt + question, ~75% of the tokens in the demo data) carry no label anyway.

A batch's common prefix (SmolLM2's default system prompt and the user turn's opening: 24 of the
demo's ~52 tokens per example) runs through the decoder once, and its keys and values are broadcast to every example
(:func:`response_nll`). Gradients flow through them: LoRA on ``k_proj``/``v_proj`` changes the
prefix's keys and values too, and the gradient of the broadcast is the sum over the batch of
what each example's own copy would have received, so loss and gradients equal the plain path's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import random
import time
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from client import checkpointing
from client.loss import output_nll
from shared.adapter import causal_lm
from shared.config import EvalConfig, TrainConfig
from shared.data import IGNORE_INDEX, Encoded, collate

ONEDNN_CACHE = 64
"""Primitives oneDNN (torch's bf16 matmuls on CPU) keeps cached, per cache, in a training process.

Both caches (oneDNN's own and ideep's, in torch) hold 1,024 by default, one per matmul shape, and
each cached primitive holds memory: with variable-length batches (a new shape nearly every step)
the training process kept growing (SmolLM2 4-bit, bf16, seq 128, batch 4, checkpointing, the
demo's data: 716 MB peak after 1 step, 942 after 15, 1,047 after 45). At 64, every shape of a
step stays cached and the peak levels off (~810-830 MB from step 12 to 20) at the same time per step.
Read when torch makes its first oneDNN primitive, so set on import, before any training; an
operator's own ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` / ``LRU_CACHE_CAPACITY`` is kept."""
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, str(ONEDNN_CACHE))


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training reports."""

    mean_loss: float
    """Mean training loss (response tokens) over the round's steps."""
    steps: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Held-out loss: mean cross-entropy per response token."""

    loss: float
    tokens: int
    examples: int


def round_seed(run_seed: int, server_round: int, name: str, dispatch: str = "", masked_run: str | None = None) -> int:
    """Return the seed of the batches a device draws for a round (``dispatch``: async's ``"/<task>"`` or ``""``).

    A plain round: crc32 of ``"<seed>/<round><dispatch>/<name>"``, the same in every process, so a
    run is reproducible; not a secret, and it need not be one: the delta leaves in the clear.

    A round whose delta leaves masked (``masked_run``: the release run id): 64 bits of SHA-256 over
    the run id as well. A device masks once per round of a run (``AcceptedReleases.mask_once``), so
    every delta it masks is trained on batches drawn from a seed of its own: a coordinator that runs
    the same secure round again in another run (same seed, same round, without one device) gets two
    sums whose difference is a delta trained on other batches, not that device's delta, and no
    choice of seed or run id makes two such seeds collide (crc32's state could be steered to).
    """
    if masked_run is None:
        return zlib.crc32(f"{run_seed}/{server_round}{dispatch}/{name}".encode())
    text = json.dumps(["fleetlora masked round", masked_run, run_seed, server_round, dispatch, name])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def train_adapter(model: Any, data: list[Encoded], cfg: TrainConfig, pad_id: int, seed: int) -> TrainResult:
    """Run ``cfg.steps`` AdamW steps on the trainable (LoRA) parameters.

    Batches are drawn by walking a shuffled order of ``data`` (reshuffled at each epoch)
    seeded by ``seed``, so a client's round is reproducible. A fresh optimizer is built
    every round: no optimizer state travels between rounds or devices.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: attach a LoRA adapter first")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    order = _batches(len(data), cfg.batch_size, seed)
    micro = cfg.micro_batch_size or cfg.batch_size
    share = not cfg.gradient_checkpointing  # transformers keeps no cache under checkpointing
    losses = []
    t0 = time.perf_counter()
    no_cast, autocast = lora_in_compute_dtype(model)
    try:  # a failed round leaves the model as it found it: no checkpointing, peft's casts on, eval mode
        if cfg.gradient_checkpointing:
            checkpointing.enable(model)
        model.train()
        with no_cast:
            for _ in range(cfg.steps):
                examples = [data[i] for i in next(order)]
                losses.append(_step(model, examples, micro, share, pad_id, autocast))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        if cfg.gradient_checkpointing:
            checkpointing.disable(model)
        model.eval()
    return TrainResult(mean_loss=sum(losses) / len(losses), steps=cfg.steps, seconds=time.perf_counter() - t0)


def _step(model: Any, examples: list[Encoded], micro: int, share: bool, pad_id: int, autocast: Any) -> float:
    """Accumulate one step's gradients over micro-batches, normalized by the whole batch's tokens; return its loss."""
    count = max(1, sum(_labelled(e) for e in examples))
    total = 0.0
    for start in range(0, len(examples), micro):
        with autocast():
            nll, _ = response_nll(model, collate(examples[start : start + micro], pad_id), share)
        loss = nll / count
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr")
        loss.backward()
        total += loss.item()
    return total


@torch.inference_mode()
def evaluate(model: Any, data: list[Encoded], cfg: EvalConfig, pad_id: int) -> EvalResult:
    """Token-weighted mean cross-entropy over the response tokens of ``data[:cfg.max_examples]``."""
    model.eval()
    subset = data[: cfg.max_examples]
    total, tokens = 0.0, 0
    for start in range(0, len(subset), cfg.batch_size):
        nll, count = response_nll(model, collate(subset[start : start + cfg.batch_size], pad_id))
        total += nll.item()
        tokens += count
    if tokens == 0:
        raise ValueError("held-out data has no response tokens to score")
    loss = total / tokens
    if not math.isfinite(loss):
        raise FloatingPointError(f"held-out loss is {loss}")
    return EvalResult(loss=loss, tokens=tokens, examples=len(subset))


def lora_in_compute_dtype(model: Any) -> tuple[contextlib.AbstractContextManager[Any], Any]:
    """Run the LoRA branches in the base's compute dtype where it is bf16 (mixed precision, as torch AMP).

    peft casts each LoRA layer's input to its factors' dtype (fp32, where AdamW keeps them): over a
    bf16 base that is an fp32 copy of every LoRA input per layer, saved for the backward pass
    (0.6 GB of a 2.4 GB step at seq 256 x batch 4). With that cast off and the forward pass under
    ``torch.autocast``, the branch multiplies the bf16 input by bf16 copies of A and B, autograd
    saves the input the base layer already has, and the gradients still land in the fp32 factors.
    An fp32 base is unchanged.

    Returns the context for a whole step (the cast stays off through the backward pass, where
    activation checkpointing recomputes the forward) and a factory of the forward's autocast.
    """
    base_lm = causal_lm(model)
    dtype = base_lm.get_input_embeddings().weight.dtype
    if dtype == torch.float32:
        return contextlib.nullcontext(), contextlib.nullcontext
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model), functools.partial(torch.autocast, "cpu", dtype=dtype)


def response_nll(model: Any, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> tuple[torch.Tensor, int]:
    """Return the summed cross-entropy over labelled tokens, and their count.

    Runs the decoder stack on every position (a common prefix of the batch once, see
    :func:`_hidden`), then the output layer on labelled positions only: ``logits =
    lm_head(h[keep])`` is (N, V) for N response tokens instead of (B, T, V), made a chunk of
    tokens at a time (:func:`client.loss.output_nll`).
    """
    base_lm = causal_lm(model)
    hidden = _hidden(base_lm.model, batch["input_ids"], batch["attention_mask"], share_prefix)  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    return output_nll(base_lm.lm_head, hidden[:, :-1][keep], targets[keep]), count  # (N, V) logits, chunked


def _hidden(decoder: Any, ids: torch.Tensor, mask: torch.Tensor, share_prefix: bool) -> torch.Tensor:
    """Return the decoder's last hidden states (B, T, H), the batch's common prefix computed once.

    The prefix (P tokens, identical and unpadded in every row) runs as a batch of one with a
    key/value cache; the cache is repeated to B rows and the rest (B, T - P) attends to it at
    positions P.. as the plain path's rows would. Exact up to float rounding: same attention
    inputs, same positions (right padding), same masked positions.
    """
    p = _common_prefix(ids, mask) if share_prefix and ids.shape[0] > 1 else 0
    if p < MIN_SHARED_PREFIX:  # no cache: nothing reads it (and checkpointing warns about one)
        return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    head = decoder(input_ids=ids[:1, :p], use_cache=True)
    cache = head.cache
    cache.batch_repeat_interleave(ids.shape[0])  # (1, heads, P, d) -> (B, heads, P, d), differentiable
    rest = decoder(input_ids=ids[:, p:], attention_mask=mask, cache=cache, use_cache=True)
    prefix = head.last_hidden_state.expand(ids.shape[0], -1, -1)  # (B, P, H)
    return torch.cat([prefix, rest.last_hidden_state], dim=1)


MIN_SHARED_PREFIX = 8
"""Shorter common prefixes run the plain path: an extra decoder call costs more than it saves."""


def _common_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Length of the prefix equal in every row and unpadded, leaving at least one position after it."""
    same = (ids == ids[:1]).all(dim=0) & mask.bool().all(dim=0)  # (T,)
    differs = (~same).nonzero()
    p = int(differs[0]) if len(differs) else ids.shape[1]
    return min(p, ids.shape[1] - 1)


def _labelled(example: Encoded) -> int:
    """Tokens whose next token is scored (what ``response_nll`` counts)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def _batches(n: int, batch_size: int, seed: int) -> Any:
    """Yield index batches forever, reshuffling at each pass over the data."""
    rng = random.Random(seed)
    size = min(batch_size, n)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]
