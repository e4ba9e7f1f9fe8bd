"""Aggregation of client LoRA adapters: pure, streaming functions over ``dict[str, Tensor]``.

Every method folds client adapters in one at a time (``add``) and produces the new global
adapter at the end (``result``): memory holds a fixed running state per layer, whatever the
number of clients. Keys are PEFT's (``<module>.lora_A.weight``, ``<module>.lora_B.weight``);
for a module, A is (r, d_in), B is (d_out, r) and the update to the frozen weight is

    dW = s * B @ A,   s = alpha / r.

Methods (select with run-config ``aggregation.method``):

* ``fedavg``: average A and B separately (FedIT; biased: mean(B) @ mean(A) != mean(B @ A));
* ``exact``: average dW, re-factor to rank r by truncated SVD (FlexLoRA);
* ``ffa``: A frozen from the shared seed, only B trained and averaged: exact by construction
  (FFA-LoRA);
* ``ties``: TIES-merging of the round's dW updates (trim, elect sign, disjoint mean), re-factored.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Protocol

import torch

State = dict[str, torch.Tensor]
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
TRIM_SAMPLE = 1 << 16


class NoUpdatesError(ValueError):
    """Nothing was left to aggregate (no update arrived, or every one was rejected)."""


class Aggregator(Protocol):
    """A streaming aggregation method."""

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one client's adapter in, weighted by its example count."""

    def result(self) -> State:
        """Return the new global adapter."""


class RunningWeightedMean:
    """Streaming weighted mean: fold ``(state, weight)`` pairs, read the mean at the end.

    Holds one fp32 sum per key plus the total weight, whatever the number of updates.
    """

    def __init__(self) -> None:
        self._sum: State = {}
        self._weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one update in; every update must carry the same keys and shapes."""
        if not weight > 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        if self._sum and set(state) != set(self._sum):
            raise ValueError("update keys differ from the first update's keys")
        for key, tensor in state.items():
            if key not in self._sum:
                self._sum[key] = torch.zeros(tensor.shape)
        keys = list(state)  # one multi-tensor call (hundreds of small tensors): fp16 inputs accumulate in fp32
        torch._foreach_add_([self._sum[k] for k in keys], [state[k].float() for k in keys], alpha=weight)
        self._weight += weight
        self.count += 1

    def result(self) -> State:
        """Return the weighted mean, sum_i w_i x_i / sum_i w_i."""
        if not self.count:
            raise NoUpdatesError("no updates to aggregate")
        return {k: v / self._weight for k, v in self._sum.items()}


def fedavg(updates: Iterable[tuple[Mapping[str, torch.Tensor], float]]) -> State:
    """FedAvg (McMahan et al., 2017, arXiv 1602.05629) of LoRA factors, as FedIT does (arXiv 2305.05644).

    For each tensor key (every ``lora_A`` and ``lora_B`` separately):

        x = sum_i n_i x_i / sum_i n_i,   n_i = client i's example count.

    Averaging A and B separately is the baseline: mean(B) @ mean(A) != mean(B @ A).

    Parameters
    ----------
    updates
        ``(state, num_examples)`` pairs, consumed one at a time.
    """
    running = RunningWeightedMean()
    for state, weight in updates:
        running.add(state, weight)
    return running.result()


def apply_update(global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> State:
    """Return ``global + delta`` (fp32); keys the delta lacks (A under FFA-LoRA) stay as they are."""
    keys = [k for k in global_state if k in delta]  # one multi-tensor add: the same sums as one add per key
    summed = torch._foreach_add([global_state[k].float() for k in keys], [delta[k].float() for k in keys])
    out = dict(zip(keys, summed, strict=True))
    return {k: out.get(k, v) for k, v in global_state.items()}


def modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """List the module prefixes of an adapter state (each has one A and one B)."""
    return sorted(k[: -len(LORA_A)] for k in state if k.endswith(LORA_A))


def delta_w(state: Mapping[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    """Return dW = s * B @ A of one module, (d_out, d_in), fp32."""
    return scale * (state[module + LORA_B].float() @ state[module + LORA_A].float())


def refactor(dw: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of dW (Eckart-Young): dW / s ~= B @ A with B = U sqrt(S), A = sqrt(S) V^T.

    The square root splits the singular values evenly between the factors, so neither one
    carries all the scale into the next round.
    """
    u, s, vh = torch.linalg.svd(dw / scale, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]  # B (d_out, r), A (r, d_in)


class ExactAggregator:
    """Exact LoRA aggregation in product space, then truncated SVD (FlexLoRA, arXiv 2402.11505).

        dW = sum_i n_i s B_i A_i / sum_i n_i;   (B, A) = rank-r SVD factors of dW / s.

    The mean is exact; only the re-factorization to rank r loses what lies beyond rank r.
    Memory: one (d_out, d_in) fp32 sum per module.
    """

    def __init__(self, rank: int, scale: float) -> None:
        self.rank, self.scale = rank, scale
        self._sum: State = {}
        self._weight = 0.0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one client's dW_i, weighted."""
        for m in modules(state):
            b, a = state[m + LORA_B].float(), state[m + LORA_A].float()
            if m not in self._sum:
                self._sum[m] = torch.zeros(b.shape[0], a.shape[1])
            self._sum[m].addmm_(b, a, alpha=self.scale * weight)  # one pass over (d_out, d_in)
        self._weight += weight

    def result(self) -> State:
        """Return rank-r factors of the weighted mean dW."""
        if not self._sum:
            raise NoUpdatesError("no updates to aggregate")
        out: State = {}
        for m, total in self._sum.items():
            out[m + LORA_B], out[m + LORA_A] = refactor(total / self._weight, self.rank, self.scale)
        return out


class FfaAggregator:
    """FFA-LoRA (Sun et al., 2024, arXiv 2403.12313): A frozen from a shared seed, B averaged.

        dW = s * (sum_i n_i B_i / sum_i n_i) @ A,   exact because every client has the same A.

    Clients upload only B (half the uplink for square layers). An update whose A differs from
    the global A is refused: it would make the average inexact.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self._a = {k: v.float() for k, v in global_state.items() if k.endswith(LORA_A)}
        self._mean = RunningWeightedMean()

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one client's B factors; its A factors, if sent, must equal the frozen ones."""
        for key, a in self._a.items():
            if key in state and not torch.equal(state[key].float(), a):
                raise ValueError(f"{key} differs from the frozen A: FFA-LoRA clients must not train A")
        self._mean.add({k: v for k, v in state.items() if k.endswith(LORA_B)}, weight)

    def result(self) -> State:
        """Return the mean B with the frozen A."""
        return {**self._a, **self._mean.result()}


class TiesAggregator:
    """TIES-merging (Yadav et al., 2023, arXiv 2306.01708) of the round's updates, in dW space.

    For client i and module m, the task vector is this round's change of the product,
    tau_i = dW_i - dW_global. Then, entry by entry:

    1. trim: keep the top ``density`` fraction of |tau_i| (per client, per module), zero the rest;
    2. elect sign: gamma = sign(sum_i n_i tau_i) over the trimmed vectors;
    3. disjoint mean: tau = mean of the tau_i whose sign agrees with gamma (weighted by n_i);

    new dW = dW_global + lambda * tau, re-factored to rank r by SVD. PEFT's ``ties`` merges A
    and B separately, which is biased like FedAvg of factors; here it runs on dW.

    Streams in O(parameters): per module it keeps weighted sums and weights of the positive and
    of the negative trimmed entries; the elected sign is the sign of their sum.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], rank: int, scale: float, density: float, lam: float):
        if not 0 < density <= 1:
            raise ValueError(f"TIES density must be in (0, 1], got {density}")
        self.rank, self.scale, self.density, self.lam = rank, scale, density, lam
        self._base = {m: delta_w(global_state, m, scale) for m in modules(global_state)}
        self._pos: State = {}
        self._neg: State = {}
        self._pos_w: State = {}
        self._neg_w: State = {}
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Trim one client's task vector and fold it into the signed running sums."""
        for m, base in self._base.items():
            if m not in self._pos:
                for acc in (self._pos, self._neg, self._pos_w, self._neg_w):
                    acc[m] = torch.zeros_like(base)
            b, a = state[m + LORA_B].float(), state[m + LORA_A].float()
            tau = torch.addmm(base, b, a, beta=-1, alpha=self.scale)  # s B A - dW_global, (d_out, d_in)
            tau = _trim(tau, self.density)  # sparsify
            pos = tau.clamp(min=0)
            self._pos[m].add_(pos, alpha=weight)
            self._neg[m].add_(tau.sub_(pos), alpha=weight)  # tau now holds its negative part
            self._pos_w[m].add_(pos.sign_(), alpha=weight)
            self._neg_w[m].sub_(tau.sign_(), alpha=weight)
        self.count += 1

    def result(self) -> State:
        """Elect signs, take the disjoint means, apply lambda and re-factor."""
        if not self.count:
            raise NoUpdatesError("no updates to aggregate")
        out: State = {}
        for m, base in self._base.items():
            positive = (self._pos[m] + self._neg[m]) >= 0  # elect sign
            total = torch.where(positive, self._pos[m], self._neg[m])  # disjoint merge
            weight = torch.where(positive, self._pos_w[m], self._neg_w[m])
            tau = torch.where(weight > 0, total / weight.clamp(min=1e-12), torch.zeros_like(total))
            out[m + LORA_B], out[m + LORA_A] = refactor(base + self.lam * tau, self.rank, self.scale)
        return out


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (ties at the cut kept), in place.

    Above ``TRIM_SAMPLE`` entries the cut is the same quantile of a fixed random sample of that
    many magnitudes: the kept fraction is then ``density`` within ~0.2% (binomial standard error
    sqrt(d(1 - d) / 65536) = 0.0016 at d = 0.2), and trimming costs O(n) instead of a full selection.
    """
    if density >= 1:
        return tau
    magnitude = tau.abs()
    pool = magnitude.flatten()
    if pool.numel() > TRIM_SAMPLE:
        pool = pool.index_select(0, sample_index(pool.numel()))
    k = max(1, int(round(density * pool.numel())))
    cut = pool.kthvalue(pool.numel() - k + 1).values
    return tau.mul_(magnitude >= cut)


@functools.lru_cache(maxsize=64)
def sample_index(numel: int) -> torch.Tensor:
    """``TRIM_SAMPLE`` sorted random positions in ``range(numel)``, the same on every call."""
    gen = torch.Generator().manual_seed(numel)
    return torch.randint(numel, (TRIM_SAMPLE,), generator=gen).sort().values


def make_aggregator(
    method: str,
    global_state: Mapping[str, torch.Tensor],
    rank: int,
    alpha: float,
    density: float = 0.2,
    lam: float = 1.0,
) -> Aggregator:
    """Build the streaming aggregator for ``method``, starting from this round's global adapter."""
    scale = alpha / rank
    if method == "fedavg":
        return RunningWeightedMean()
    if method == "exact":
        return ExactAggregator(rank, scale)
    if method == "ffa":
        return FfaAggregator(global_state)
    if method == "ties":
        return TiesAggregator(global_state, rank, scale, density, lam)
    raise ValueError(f"unknown aggregation method '{method}'")
