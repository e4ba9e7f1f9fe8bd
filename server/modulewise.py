"""Bounded-memory ``exact`` and ``ties``: spool the round's deltas, then aggregate one module at a time.

Same formulas as :class:`server.aggregate.ExactAggregator` and :class:`server.aggregate.TiesAggregator`
(papers and notation there: dW = s B A, s = alpha / r, local_i = global + delta_i). What changes is
the order of the loops: the streaming classes fold update by update and keep dense state for every
module at once (0.4-2.7 GB at SmolLM2-135M shapes, 3.9-19.5 GB at Llama-3.2-1B shapes); here each
accepted delta goes to a :class:`server.spool.Spool` on receipt, and ``result`` walks the modules,
reading that module's factors of a block of updates at a time. At most one module's dense buffers
live at a time (one (d_out, d_in) sum for exact, four for ties: 64 MB / 256 MB for Llama-3.2-1B's MLP),
whatever the number of updates or modules. Where every module's dense sum fits ``DENSE_BYTES`` (SmolLM2-135M
shapes: 0.42 GB), exact needs no spool: :class:`DenseExact` folds blocks of updates into in-memory sums.

Throughput comes from batching across updates: ``exact`` sums a block of updates with one GEMM,
[w_1 B_1 | ... | w_c B_c] @ [A_1; ...; A_c], on torch's intra-op threads; ``ties`` forms, trims and
folds each update's task vector row by row in one compiled loop (``server/ties_fold.py``: one pass
over the entries instead of a dozen torch ops), its threads splitting the rows. The rank-r re-factorization is a
randomized SVD with a seeded test matrix (deterministic), which is exact when the mean dW has rank
<= r + ``OVERSAMPLE`` and near-optimal otherwise (see :func:`randomized_refactor`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from server.aggregate import (
    LORA_A,
    LORA_B,
    TRIM_SAMPLE,
    NoUpdatesError,
    State,
    modules,
    sample_index,
)
from server.shards import Sharded
from server.spool import Spool
from server.ties_fold import fold_block, kth_largest, merge, sampled_magnitudes

BLOCK_BYTES = 64 << 20  # factors of one block of updates (fp32), per module
DENSE_BYTES = 1 << 30  # exact keeps every module's fp32 sum in memory (no spool) while they fit: 0.42 GB at 135M
DENSE_BLOCK = 16  # updates per GEMM of DenseExact (16, 32 and 64 measured alike at 135M shapes; 16 holds least)
TIES_BLOCK = 128  # at most this many updates per ties block: their A's stay in cache across a row tile
OVERSAMPLE, POWER_ITERS = 10, 4


def spool_shapes(global_state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Shapes of A and B of every module, module by module (a module's factors adjacent on disk)."""
    return {k: tuple(global_state[k].shape) for m in modules(global_state) for k in (m + LORA_A, m + LORA_B)}


def dense_entries(global_state: Mapping[str, torch.Tensor]) -> int:
    """Entries of one dense dW over every module: sum of d_out d_in (what a dense sum of each holds)."""
    return sum(global_state[m + LORA_B].shape[0] * global_state[m + LORA_A].shape[1] for m in modules(global_state))


def randomized_refactor(dw: torch.Tensor, rank: int, scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of dW / s by randomized subspace iteration (Halko, Martinsson, Tropp 2011, alg. 4.4).

    With a Gaussian test matrix Omega (d_in, k), k = r + p: Y = (M M^T)^q M Omega, Q = orth(Y),
    then the SVD of the small k x d_in matrix Q^T M = U' S V^T gives M ~= (Q U') S V^T, truncated to
    r and split B = U sqrt(S), A = sqrt(S) V^T as :func:`server.aggregate.refactor` does. Exact (up
    to rounding) when rank(M) <= k; otherwise its error exceeds the best rank-r error by a factor
    that decays like (sigma_{r+1} / sigma_k)^(2q) (HMT, sec. 10.4). Costs O(d_out d_in k) instead of
    a full SVD's O(d_out d_in min(d_out, d_in)). Re-orthonormalized at each step for stability.
    """
    m = dw / scale
    k = min(rank + OVERSAMPLE, *m.shape)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(m @ torch.randn(m.shape[1], k, generator=gen))
    for _ in range(POWER_ITERS):
        q, _ = torch.linalg.qr(m.T @ q)
        q, _ = torch.linalg.qr(m @ q)
    u, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    root = s[:rank].sqrt()
    return (q @ u[:, :rank]) * root, root[:, None] * vh[:rank]  # B (d_out, r), A (r, d_in)


class SpooledAggregator:
    """Common part: spool deltas on ``add``, walk modules in ``result``; removes its spool at the end."""

    def __init__(self, global_state: Mapping[str, torch.Tensor], rank: int, scale: float, spool: Spool) -> None:
        self.rank, self.scale, self.spool = rank, scale, spool
        self._global = {k: v.float() for k, v in global_state.items()}

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Spool one client's delta (local = global + delta), weighted by its example count."""
        self.spool.add(delta, weight)

    def close(self) -> None:
        """Remove the spool (``result`` does it too); for a round that ends before ``result``."""
        self.spool.close()

    def result(self) -> State:
        """Return the new global adapter, one module at a time; the spool is removed either way."""
        try:
            if not len(self.spool):
                raise NoUpdatesError("no updates to aggregate")
            out: State = {}
            for m in modules(self._global):
                out[m + LORA_B], out[m + LORA_A] = self.module(m)
            return out
        finally:
            self.spool.close()

    def module(self, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the new (B, A) of module ``m``."""
        raise NotImplementedError

    def blocks(self, m: str, most: int | None = None) -> list[tuple[int, int]]:
        """Update ranges ``[start, stop)`` whose factors of ``m`` fit ``BLOCK_BYTES`` in fp32 (and ``most`` updates)."""
        b, a = self._global[m + LORA_B], self._global[m + LORA_A]
        size = max(1, BLOCK_BYTES // (4 * (b.numel() + a.numel())))
        size = size if most is None else max(1, min(size, most))
        n = len(self.spool)
        return [(i, min(n, i + size)) for i in range(0, n, size)]

    def factors(self, m: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local factors B (c, d_out, r), A (c, r, d_in) of updates ``[start, stop)`` and their weights (c,)."""
        keys = [m + LORA_A, m + LORA_B]  # side by side in spool_shapes' records: one read per record
        if self.spool.adjacent(keys):
            da, db = self.spool.read_adjacent(keys, start, stop)
        else:
            da, db = (self.spool.read(k, start, stop) for k in keys)
        b, a = self._global[m + LORA_B] + db, self._global[m + LORA_A] + da  # as apply_update: fp32 sums
        return b, a, torch.tensor(self.spool.weights[start:stop])


class SpooledExact(SpooledAggregator):
    """FlexLoRA's exact mean of products (arXiv 2402.11505), one module at a time.

        dW = sum_i n_i s B_i A_i / sum_i n_i,   one GEMM per block of updates:
        sum_{i in block} n_i B_i A_i = [n_1 B_1 | ... | n_c B_c] @ [A_1; ...; A_c].

    Memory: one (d_out, d_in) fp32 sum and one block of factors.
    """

    def module(self, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the module's products over every block of updates, then re-factor the mean."""
        d_out, d_in = self._global[m + LORA_B].shape[0], self._global[m + LORA_A].shape[1]
        total = torch.zeros(d_out, d_in)
        for start, stop in self.blocks(m):
            b, a, w = self.factors(m, start, stop)
            wide = (b * w[:, None, None]).permute(1, 0, 2).reshape(d_out, -1)  # [w_1 B_1 | ... | w_c B_c]
            total.addmm_(wide, a.reshape(-1, d_in), alpha=self.scale)
        return randomized_refactor(total / sum(self.spool.weights), self.rank, self.scale)


class DenseExact:
    """The same exact mean as :class:`SpooledExact`, for shapes whose dense sums fit ``DENSE_BYTES``: no spool.

    Every module's fp32 sum lives in memory (4 sum d_out d_in bytes: 0.42 GB at SmolLM2-135M shapes,
    3.9 GB at Llama-3.2-1B's, which spool). ``add`` copies a delta into a block of ``DENSE_BLOCK``
    updates held module-major ((c, r, d_in) A's and (c, d_out, r) B's per module); a full block is
    folded into each module's sum by the block GEMM of :class:`SpooledExact`, with the same
    arithmetic: local = global + delta in fp32, sum += s [n_1 B_1 | ... | n_c B_c] @ [A_1; ...; A_c].
    A delta is written once and read once, in memory, instead of written to and read back from disk.
    Memory: the sums plus one block of factors (0.16 GB at 135M shapes), whatever the update count.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], rank: int, scale: float) -> None:
        self.rank, self.scale = rank, scale
        self._global = {k: v.float() for k, v in global_state.items()}
        self._modules = modules(self._global)
        self._keys = [m + s for m in self._modules for s in (LORA_A, LORA_B)]
        self._block = {k: torch.empty(DENSE_BLOCK, *self._global[k].shape) for k in self._keys}
        self._slots = [[self._block[k][i] for k in self._keys] for i in range(DENSE_BLOCK)]  # update i's views
        self._sums: dict[str, torch.Tensor] = {}
        self._pending: list[float] = []  # weights of the block's updates
        self._weight, self.count = 0.0, 0

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Copy one client's delta (local = global + delta) into the block, weighted; fold a full block."""
        if not self._slots:
            raise ValueError("the aggregator is closed: its round has ended")
        if not weight > 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        if set(delta) != set(self._keys):
            raise ValueError("update keys differ from the round's keys")
        slot = self._slots[len(self._pending)]
        for view, key in zip(slot, self._keys, strict=True):
            if delta[key].shape != view.shape:  # copy_ would broadcast a smaller tensor
                raise ValueError(f"{key}: shape {tuple(delta[key].shape)} is not the expected {tuple(view.shape)}")
        torch._foreach_copy_(slot, [delta[k] for k in self._keys])  # one multi-tensor copy (and cast)
        self._pending.append(float(weight))
        self._weight += weight
        self.count += 1
        if len(self._pending) == DENSE_BLOCK:
            self._fold()

    def _fold(self) -> None:
        """Add the block's weighted products into every module's sum, one GEMM per module."""
        c, w = len(self._pending), torch.tensor(self._pending)
        for m in self._modules:
            a = self._block[m + LORA_A][:c].add_(self._global[m + LORA_A])  # (c, r, d_in), as apply_update
            b = self._block[m + LORA_B][:c].add_(self._global[m + LORA_B]).mul_(w[:, None, None])  # (c, d_out, r)
            d_out, d_in = b.shape[1], a.shape[2]
            if m not in self._sums:
                self._sums[m] = torch.zeros(d_out, d_in)
            wide = b.permute(1, 0, 2).reshape(d_out, -1)  # [w_1 B_1 | ... | w_c B_c]
            self._sums[m].addmm_(wide, a.reshape(-1, d_in), alpha=self.scale)
        self._pending = []

    def result(self) -> State:
        """Return the new global adapter: fold the last block, re-factor each module's mean; frees the sums."""
        try:
            if not self.count:
                raise NoUpdatesError("no updates to aggregate")
            if self._pending:
                self._fold()
            out: State = {}
            for m in self._modules:
                out[m + LORA_B], out[m + LORA_A] = randomized_refactor(
                    self._sums.pop(m) / self._weight, self.rank, self.scale
                )
            return out
        finally:
            self.close()

    def close(self) -> None:
        """Free the block and the sums (``result`` does it too); idempotent."""
        self._block, self._slots, self._sums, self._pending = {}, [], {}, []


class SpooledTies(SpooledAggregator):
    """TIES-merging (Yadav et al., 2023, arXiv 2306.01708) in dW space, one module at a time.

    tau_i = s B_i A_i - dW_global; trim each tau_i to its top ``density`` magnitudes (the cut is the
    sampled quantile at the same entries as :func:`server.aggregate._trim`, computed from the
    factors without forming tau_i, see ``_cuts``); elect gamma = sign(sum_i n_i tau_i); disjoint mean of
    the agreeing entries; new dW = dW_global + lambda tau, re-factored. Per module it keeps four sums
    of the trimmed t_i: P = sum n_i t_i over t_i > 0, N = the same over t_i < 0, and the weights
    Wp = sum n_i [t_i > 0], Wn = sum n_i [t_i < 0]: gamma = sign(P + N), tau = P / Wp or N / Wn.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], rank: int, scale: float, spool: Spool,
                 density: float, lam: float) -> None:  # fmt: skip
        if not 0 < density <= 1:
            raise ValueError(f"TIES density must be in (0, 1], got {density}")
        super().__init__(global_state, rank, scale, spool)
        self.density, self.lam = density, lam

    def module(self, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold every block of updates into the module's four sums, then elect, merge and re-factor."""
        base = self.scale * (self._global[m + LORA_B] @ self._global[m + LORA_A])
        acc = torch.zeros(4, *base.shape)  # P, N, Wp, Wn
        for start, stop in self.blocks(m, TIES_BLOCK):  # the fold streams every A of a block per row tile
            b, a, w = self.factors(m, start, stop)
            self._fold_block(acc, base, b, a, w)
        return randomized_refactor(merge(acc, base, self.lam), self.rank, self.scale)  # elect, disjoint mean

    def _fold_block(self, acc: torch.Tensor, base: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                    w: torch.Tensor) -> None:  # fmt: skip
        """Trim the block's task vectors and add them into ``acc``, in one fused pass (``server/ties_fold.py``)."""
        fold_block(acc, base, b, a, w, self._cuts(base, b, a), self.scale)

    def _cuts(self, base: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Each update's trim threshold: the ``density`` quantile of |tau_i| at today's sampled entries.

        The very entries :func:`server.aggregate._trim` samples (``TRIM_SAMPLE`` = 65,536 fixed
        random positions of the module, or all of them when it is smaller), but each computed from
        the factors, tau_i[p, q] = s B_i[p] . A_i[:, q] - dW_global[p, q], without forming tau_i:
        the cut is the streaming aggregator's, up to rounding (an earlier 64 x 64 grid of rows and
        columns was biased on real updates, whose rows differ in scale: 13% max difference of dW).
        """
        c = b.shape[0]
        if self.density >= 1:
            return torch.zeros(c)
        d_out, d_in = base.shape
        numel = d_out * d_in
        index = sample_index(numel) if numel > TRIM_SAMPLE else torch.arange(numel)
        rows, cols = index // d_in, index % d_in
        k = max(1, int(round(self.density * index.numel())))
        return kth_largest(sampled_magnitudes(base, b, a, rows, cols, self.scale), k)  # _trim's order statistic


class Streaming:
    """fedavg / ffa: each ``global + delta`` folded in at once (no spool), into one flat fp32 sum.

    The arithmetic of :class:`server.aggregate.RunningWeightedMean` / :class:`~server.aggregate.FfaAggregator`
    entry for entry (sum += n_i fp32(global + delta_i); mean = sum / sum_i n_i; FFA-LoRA averages B and
    refuses an update whose A is not the frozen one), bit-identical to them (a test), but the adapter is
    one flat buffer: an update is one multi-tensor copy and two vector adds instead of three ops per
    tensor (420 tensors at SmolLM2-135M). Holds two adapter-sized fp32 buffers.
    """

    def __init__(self, method: str, global_state: Mapping[str, torch.Tensor], rank: int, alpha: float) -> None:
        del rank, alpha  # the factors are averaged separately: no product is formed
        self._global = global_state
        self._keys = [k for k in global_state if method == "fedavg" or k.endswith(LORA_B)]  # the averaged tensors
        self._frozen = {k: v.float() for k, v in global_state.items() if k not in self._keys}  # FFA-LoRA's A
        self._base = torch.cat([global_state[k].float().reshape(-1) for k in self._keys])
        self._sum, self._buffer = torch.zeros_like(self._base), torch.empty_like(self._base)
        self._sizes = [global_state[k].numel() for k in self._keys]
        self._views = self._shaped(self._buffer)
        self._weight, self.count = 0.0, 0

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold ``global + delta`` in, weighted; a key the delta lacks counts as unchanged."""
        if not weight > 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        for key, a in self._frozen.items():
            if key in delta and not torch.equal(a + delta[key].float(), a):
                raise ValueError(f"{key} differs from the frozen A: FFA-LoRA clients must not train A")
        if all(k in delta for k in self._keys):
            torch._foreach_copy_(self._views, [delta[k] for k in self._keys])  # one multi-tensor copy
        else:
            for view, key in zip(self._views, self._keys, strict=True):
                if key in delta:
                    view.copy_(delta[key])
                else:
                    view.zero_()
        self._buffer.add_(self._base)  # delta + global: today's global + delta, the same rounding
        self._sum.add_(self._buffer, alpha=weight)
        self._weight += weight
        self.count += 1

    def result(self) -> State:
        """Return the new global adapter (every tensor its own storage, as safetensors needs)."""
        if not self.count:
            raise NoUpdatesError("no updates to aggregate")
        mean = self._shaped(self._sum / self._weight)
        return {**self._frozen, **{k: v.clone() for k, v in zip(self._keys, mean, strict=True)}}

    def _shaped(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Return views of an adapter-sized flat buffer as the averaged tensors, in ``_keys`` order."""
        parts = torch.split(flat, self._sizes)
        return [v.view(self._global[k].shape) for v, k in zip(parts, self._keys, strict=True)]

    def close(self) -> None:
        """Nothing to remove: streaming methods keep no spool."""


def round_aggregator(
    method: str,
    global_state: Mapping[str, torch.Tensor],
    rank: int,
    alpha: float,
    density: float = 0.2,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
    folder: str | Path | None = None,
    workers: int = 1,
    address: str = "",
) -> Streaming | DenseExact | SpooledAggregator | Sharded:
    """Build one round's aggregator of *deltas* (``add(delta, n)``, then ``result()`` once).

    fedavg / ffa stream (one sum per factor); exact folds blocks of updates into in-memory sums while
    every module's dense sum fits ``DENSE_BYTES`` (:class:`DenseExact`); otherwise exact, and ties always,
    spool the deltas in ``dtype`` (float16 loses nothing when the wire carried fp16) under ``folder``
    (default ``TMPDIR``), removed by ``result`` or by ``close``. ``workers`` > 1 (exact / ties): that
    many Ray workers aggregate a shard of the modules each, on the Ray at ``address`` (``server/shards.py``).
    """
    scale = alpha / rank
    if method in ("fedavg", "ffa"):
        return Streaming(method, global_state, rank, alpha)
    if method not in ("exact", "ties"):
        raise ValueError(f"unknown aggregation method '{method}'")
    if workers > 1:
        return Sharded(method, global_state, rank, alpha, density, lam, dtype, workers, address)
    if method == "exact" and 4 * dense_entries(global_state) <= DENSE_BYTES:
        return DenseExact(global_state, rank, scale)
    spool = Spool(spool_shapes(global_state), dtype, folder)
    if method == "exact":
        return SpooledExact(global_state, rank, scale, spool)
    return SpooledTies(global_state, rank, scale, spool, density, lam)
