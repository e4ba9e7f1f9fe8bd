"""Record-level DP-SGD on a device (``dp.level = record``), with Opacus, and the device's own accountant.

For small fleets (cross-silo), where client-level DP has too few devices to hide one in:
each local step Poisson-samples the device's examples with q = ``train.batch-size`` / n,
computes every sampled example's gradient separately (Opacus' ``GradSampleModule`` hooks the
LoRA factors; the frozen 4-bit layers have no trainable weights and need no hooks), clips each to
L2 norm C (``dp.clip-norm``), sums them and adds N(0, (z C)^2) before the AdamW step (DP-SGD,
Abadi et al. 2016, arXiv 1607.00133; Opacus' ``DPOptimizer``). The device accounts for its own
steps with Opacus' RDP accountant over every round of the run it trained, persisted beside its
replay store (written temp + fsync + rename; an unreadable ledger fails closed: the device stops
training rather than forget what it spent). What the update then reveals about any one record is
(epsilon, delta)-bounded, whoever sees it: the coordinator included.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.adapter import causal_lm
from shared.atomic import write_atomic
from shared.config import TrainConfig
from shared.config_aggregation import MIN_NOISE_MULTIPLIER
from shared.data import IGNORE_INDEX, Encoded, collate
from shared.files import read_bounded

MAX_LEDGER_BYTES = 1 << 20
LEDGER_FILE = "dp-record-ledger.json"  # one per device, across runs: its examples are the same data


class RecordBudgetError(RuntimeError):
    """A device's record-level budget is spent, or its ledger cannot be read (fail closed)."""


@dataclass(frozen=True)
class RecordDp:
    """Record-level DP settings of one device's training."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    max_epsilon: float | None


class Ledger:
    """The record-level privacy steps a device has taken in one run: (z, q, steps) entries, as Opacus keeps them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history: list[tuple[float, float, int]] = []
        if path.exists():
            self.history = _parse_ledger(path)

    def epsilon(self, delta: float, more: tuple[float, float, int] | None = None) -> float:
        """Return epsilon at ``delta`` over the ledger (and ``more`` steps, not recorded)."""
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [*self.history, *([more] if more else [])]
        return float(accountant.get_epsilon(delta)) if accountant.history else 0.0

    def record(self, entry: tuple[float, float, int]) -> None:
        """Add ``entry`` and persist the ledger durably."""
        self.history.append(entry)
        data = json.dumps({"history": [list(h) for h in self.history]}).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, data)


def train_record_dp(
    model: Any,
    data: list[Encoded],
    cfg: TrainConfig,
    pad_id: int,
    dp: RecordDp,
    ledger: Ledger,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
) -> tuple[float, float, float]:
    """Run ``cfg.steps`` DP-SGD steps; return (mean loss, epsilon this device has spent so far, seconds).

    ``optimizer_cls`` takes the privatized gradient (AdamW, as in ``client/train.py``).

    Raises
    ------
    RecordBudgetError
        Before any step, if these steps would take the device beyond ``dp.max-epsilon``.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    q = min(1.0, cfg.batch_size / len(data))
    entry = (dp.noise_multiplier, q, cfg.steps)
    if dp.max_epsilon is not None and ledger.epsilon(dp.delta, entry) > dp.max_epsilon:
        spent = ledger.epsilon(dp.delta)
        raise RecordBudgetError(f"record-level epsilon {spent:.4g} spent; {cfg.steps} more steps exceed dp.max-epsilon")
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = GradSampleModule(model, loss_reduction="sum")
    noise = torch.Generator().manual_seed(secrets.randbits(63))  # never the run's public seed
    optimizer = DPOptimizer(
        optimizer_cls(params, lr=cfg.lr, weight_decay=0.0),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clip_norm,
        expected_batch_size=cfg.batch_size,
        loss_reduction="sum",
        generator=noise,
    )
    sampler = secrets.SystemRandom()
    model.train()
    losses, t0 = [], time.perf_counter()
    try:
        for _ in range(cfg.steps):
            batch = [e for e in data if sampler.random() < q]  # Poisson: the accountant's sampling
            losses.append(_step(model, batch, pad_id, params))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        wrapped._close()  # remove Opacus' hooks: the same model evaluates and trains next round
        model.eval()
    ledger.record(entry)
    return sum(losses) / len(losses), ledger.epsilon(dp.delta), time.perf_counter() - t0


def _step(model: Any, batch: list[Encoded], pad_id: int, params: list[torch.nn.Parameter]) -> float:
    """Backpropagate the sum of the batch's per-example mean response losses; return their mean."""
    if not batch:  # an empty Poisson sample: the step is noise alone
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
        return 0.0
    per_example = per_example_nll(model, collate(batch, pad_id))  # (B,)
    per_example.sum().backward()
    return float(per_example.detach().mean())


def per_example_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return each example's mean cross-entropy over its response tokens, shape (B,)."""
    base_lm = causal_lm(model)
    hidden = base_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    logits = base_lm.lm_head(hidden[:, :-1][keep]).float()  # (N, V)
    tokens = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")  # (N,)
    owner = keep.nonzero()[:, 0]  # which example each scored token belongs to
    sums = torch.zeros(targets.shape[0], dtype=tokens.dtype).index_add(0, owner, tokens)
    counts = keep.sum(dim=1).clamp(min=1)
    return sums / counts


def _parse_ledger(path: Path) -> list[tuple[float, float, int]]:
    """Parse the ledger file; any doubt is a :class:`RecordBudgetError` (what was spent is unknown)."""
    try:
        raw = json.loads(read_bounded(path, MAX_LEDGER_BYTES))
        entries = raw["history"]
        out = []
        for z, q, steps in entries:
            ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (z, q, steps))
            if not ok or not (z >= MIN_NOISE_MULTIPLIER and 0 < q <= 1 and isinstance(steps, int) and steps >= 1):
                raise ValueError(f"bad entry {[z, q, steps]!r:.80}")
            out.append((float(z), float(q), steps))
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecordBudgetError(
            f"the record-level privacy ledger {path.name} is unreadable ({exc}); not training"
        ) from exc
