"""TIES's per-entry fold as one fused loop (numba): form, trim and accumulate a task vector in one pass.

:meth:`server.modulewise.SpooledTies.module` needs, for every entry of a module's dW and every
update i, the trimmed task vector t_i = [|tau_i| >= cut_i] tau_i with tau_i = s B_i A_i - dW_global,
folded into four weighted sums (S, P, D, C: value, positive part, sign, |sign|). In torch that is
about a dozen passes over each update's (d_out, d_in) entries (a batched matmul, abs, compare,
mask, sign, clamp and four matrix-vector products): memory-bound, ~0.3 s per update at
SmolLM2-135M shapes on one core. Here one compiled loop does it per row: the row of tau_i is
built from B_i's row and A_i in a buffer that stays in L1, then trimmed and added into the four
sums' rows, so each entry is touched once per update. Rows are independent (``prange``: the
threads split the rows, never write the same entry), and each entry's sums run over the updates
in spool order, so the result does not depend on the thread count.

Same arithmetic as the torch path it replaces (fp32 everywhere, the same cut, the same
definition of sign: a kept entry that is exactly 0 counts for nothing); only the order of the
r products inside one entry of s B_i A_i differs, i.e. rounding.
"""

from __future__ import annotations

import threading
from typing import Any

import numba
import numpy as np
import torch

# numba's own work queue, not OpenMP: OpenMP's threads spin after a parallel region, and on a 2-core
# machine that made torch's next kernels (the re-factorization's QRs) 20-60x slower (measured). The
# work queue is not safe for concurrent launches from two threads, hence the lock in fold_block.
numba.config.THREADING_LAYER = "workqueue"  # type: ignore[attr-defined]
_LAUNCH = threading.Lock()
ROWS_PER_TILE = 8  # rows of one task handled together: A_i (r, d_in) is reused from cache across them


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _fold(acc, base, b, a, w, cut, scale):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover - compiled; tested through fold_block
    c, d_out, r = b.shape
    d_in = base.shape[1]
    tiles = (d_out + ROWS_PER_TILE - 1) // ROWS_PER_TILE
    for tile in numba.prange(tiles):
        tau = np.empty(d_in, dtype=np.float32)
        for u in range(c):
            wu = np.float32(w[u])
            cu = cut[u]
            for i in range(tile * ROWS_PER_TILE, min(d_out, (tile + 1) * ROWS_PER_TILE)):
                for j in range(d_in):
                    tau[j] = -base[i, j]
                for k in range(r):
                    coef = np.float32(scale) * b[u, i, k]
                    for j in range(d_in):
                        tau[j] += coef * a[u, k, j]
                for j in range(d_in):  # branch-free, so that it vectorizes
                    t = tau[j]
                    kept = np.float32(abs(t) >= cu) * t
                    sign = np.float32(kept > 0) - np.float32(kept < 0)
                    acc[0, i, j] += wu * kept
                    acc[1, i, j] += wu * max(kept, np.float32(0))
                    acc[2, i, j] += wu * sign
                    acc[3, i, j] += wu * abs(sign)


def fold_block(acc: torch.Tensor, base: torch.Tensor, b: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
               cut: torch.Tensor, scale: float) -> None:  # fmt: skip
    """Add a block of updates' trimmed task vectors into ``acc`` (4, d_out, d_in), in place.

    ``base`` (d_out, d_in) = s B_g A_g; ``b`` (c, d_out, r) and ``a`` (c, r, d_in) are the local
    factors, ``w`` (c,) their weights and ``cut`` (c,) their trim thresholds (0 keeps everything).
    Uses as many threads as torch does (``torch.get_num_threads``), at most numba's own limit.
    """
    c, d_out, r = b.shape
    if acc.shape != (4, d_out, a.shape[2]) or base.shape != acc.shape[1:] or a.shape[:2] != (c, r):
        raise ValueError(f"shapes do not match: acc {tuple(acc.shape)}, base {tuple(base.shape)}, "
                         f"b {tuple(b.shape)}, a {tuple(a.shape)}")  # fmt: skip
    if not acc.is_contiguous() or acc.dtype != torch.float32:
        raise ValueError("acc must be a contiguous float32 tensor (it is written in place)")
    args = (acc.numpy(), _f32(base), _f32(b), _f32(a), w.to(torch.float64).contiguous().numpy(), _f32(cut))
    _launch(_fold, *args, float(scale))


@numba.njit(parallel=True, cache=True, nogil=True)
def _merge(acc, base, lam, out):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover - compiled; tested through merge
    flat_s, flat_p, flat_d, flat_c = acc[0].ravel(), acc[1].ravel(), acc[2].ravel(), acc[3].ravel()
    flat_base, flat_out = base.ravel(), out.ravel()
    lam32, half, tiny = np.float32(lam), np.float32(0.5), np.float32(1e-12)
    for e in numba.prange(flat_out.size):
        s, p, d, c = flat_s[e], flat_p[e], flat_d[e], flat_c[e]
        if s >= 0:  # the elected sign is +: the positive entries' sum and weight
            total, weight = p, (c + d) * half
        else:
            total, weight = s - p, (c - d) * half
        tau = total / max(weight, tiny) if weight > 0 else np.float32(0)
        flat_out[e] = flat_base[e] + lam32 * tau


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _sampled(base, b, at, rows, cols, scale, out):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover
    c, _, r = b.shape
    scale32 = np.float32(scale)
    for u in numba.prange(c):
        for k in range(rows.size):
            p, q = rows[k], cols[k]
            t = np.float32(0)
            for j in range(r):
                t += b[u, p, j] * at[u, q, j]
            out[u, k] = abs(scale32 * t - base[p, q])


def sampled_magnitudes(base: torch.Tensor, b: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       scale: float) -> torch.Tensor:  # fmt: skip
    """|tau_u[p, q]| = |s B_u[p] . A_u[:, q] - base[p, q]| at the given entries, (c, entries), without forming tau_u.

    A row of B and a column of A (A transposed once per call, so the column is contiguous) per entry:
    r products each, for the 65,536 entries TIES's cut is taken on (a few ms per update and module).
    """
    c = b.shape[0]
    out = torch.empty(c, rows.numel(), dtype=torch.float32)
    at = a.detach().to(torch.float32).transpose(1, 2).contiguous()
    args = (_f32(base), _f32(b), at.numpy(), rows.to(torch.int64).numpy(), cols.to(torch.int64).numpy())
    _launch(_sampled, *args, float(scale), out.numpy())
    return out


def merge(acc: torch.Tensor, base: torch.Tensor, lam: float) -> torch.Tensor:
    """Elect each entry's sign from ``acc``'s sums, take the disjoint mean, return ``base + lam * tau``.

    gamma = sign(S) (0 counts as +); tau = P / weight(+) if gamma = + else (S - P) / weight(-), where
    weight(+) = (C + D) / 2 and weight(-) = (C - D) / 2 are the agreeing updates' total weight; an entry
    no update kept stays at ``base``. One pass instead of torch's eight.
    """
    if acc.shape != (4, *base.shape) or not acc.is_contiguous() or acc.dtype != torch.float32:
        raise ValueError(f"acc must be contiguous float32 (4, *{tuple(base.shape)}), got {tuple(acc.shape)}")
    out = torch.empty(base.shape, dtype=torch.float32)
    args = (acc.numpy(), _f32(base), float(lam), out.numpy())
    _launch(_merge, *args)
    return out


def _launch(kernel: Any, *args: Any) -> None:
    """Run a compiled kernel on as many threads as torch uses (at most numba's limit), one launch at a time."""
    with _LAUNCH:
        numba.set_num_threads(max(1, min(int(numba.config.NUMBA_NUM_THREADS), torch.get_num_threads())))  # type: ignore[attr-defined]
        kernel(*args)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()
