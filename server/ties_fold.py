"""TIES's per-entry work as compiled loops (numba): the trim cut, and the form-trim-fold of task vectors.

:meth:`server.modulewise.SpooledTies.module` needs, for every update i of a block, (1) its trim
threshold: the ``density`` quantile of |tau_i| at the 65,536 sampled entries, tau_i = s B_i A_i -
dW_global; (2) for every entry of the module, the trimmed task vector t_i = [|tau_i| >= cut_i] tau_i
folded into four weighted sums: P = sum w t_i over t_i > 0, N = sum w t_i over t_i < 0, and their
weights Wp = sum w [t_i > 0], Wn = sum w [t_i < 0]. In torch (2) is a dozen memory-bound passes over
each update's (d_out, d_in) entries; here one compiled loop does it per row tile: the rows of tau of
``GROUP`` updates are built from the factors in buffers that stay in L1, then trimmed and added into
the four sums' rows in one pass (the sums are read and written once per group, not once per update).
Rows are independent (``prange``: threads split the row tiles, never write the same entry), and each
entry's sums run over the updates in spool order (no re-association), so the result does not depend
on the thread count. (1) is a gather vectorized over the block's updates, then an exact radix select.

Same arithmetic as the torch formula (fp32, the same cut; a kept entry that is exactly 0 counts for
nothing); only the order of the r products inside one entry of s B_i A_i differs, i.e. rounding (an
entry at the cut may flip). One deliberate difference: an entry smaller than float32's smallest
normal number (1.2e-38) is never kept, also when the cut is 0 (density 1): it keeps the comparisons
exact whatever the process's denormal mode, and such an entry moves nothing.
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
GROUP = 4  # updates whose task-vector rows are trimmed and added in one pass over the sums' row
# fast-math without re-association: vectorized and contracted (FMA), but each entry's sums in spool order
FASTMATH = {"nnan", "ninf", "nsz", "contract", "arcp"}
NORMAL = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32: nothing below it is kept


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True, inline="always")
def _tau_row(tau, base_row, a, b_row, scale):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover - compiled
    """tau[:] = scale * b_row @ a - base_row: four rank components per pass over the row (one FMA chain each)."""
    r, d_in = a.shape
    k = 0
    if r >= 4:
        c0, c1, c2, c3 = scale * b_row[0], scale * b_row[1], scale * b_row[2], scale * b_row[3]
        a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
        for j in range(d_in):
            tau[j] = c0 * a0[j] + c1 * a1[j] + c2 * a2[j] + c3 * a3[j] - base_row[j]
        k = 4
    else:
        for j in range(d_in):
            tau[j] = -base_row[j]
    while k + 4 <= r:
        c0, c1, c2, c3 = scale * b_row[k], scale * b_row[k + 1], scale * b_row[k + 2], scale * b_row[k + 3]
        a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
        for j in range(d_in):
            tau[j] += c0 * a0[j] + c1 * a1[j] + c2 * a2[j] + c3 * a3[j]
        k += 4
    while k < r:
        c0, a0 = scale * b_row[k], a[k]
        for j in range(d_in):
            tau[j] += c0 * a0[j]
        k += 1


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True, inline="always")
def _keep(p, m, wp, wm, t, w, cut):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover - compiled
    """Add one update's trimmed entry t (weight w, cut >= NORMAL) into the entry's four sums; return them."""
    zero = np.float32(0)
    kept_pos, kept_neg = t >= cut, t <= -cut
    return (p + (w * t if kept_pos else zero), m + (w * t if kept_neg else zero),
            wp + (w if kept_pos else zero), wm + (w if kept_neg else zero))  # fmt: skip


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _fold(acc, base, b, a, w, cut, scale):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover - compiled; tested through fold_block
    c, d_out, _ = b.shape
    d_in = base.shape[1]
    tiles = (d_out + ROWS_PER_TILE - 1) // ROWS_PER_TILE
    s32 = np.float32(scale)
    for tile in numba.prange(tiles):
        tau = np.empty((GROUP, d_in), dtype=np.float32)
        for u0 in range(0, c, GROUP):
            n = min(GROUP, c - u0)
            for i in range(tile * ROWS_PER_TILE, min(d_out, (tile + 1) * ROWS_PER_TILE)):
                for g in range(n):
                    _tau_row(tau[g], base[i], a[u0 + g], b[u0 + g, i], s32)
                pos, neg, wpos, wneg = acc[0, i], acc[1, i], acc[2, i], acc[3, i]
                if n == GROUP:  # the four updates' trims and adds in one vectorized pass over the row
                    w0, w1 = np.float32(w[u0]), np.float32(w[u0 + 1])
                    w2, w3 = np.float32(w[u0 + 2]), np.float32(w[u0 + 3])
                    c0, c1 = max(cut[u0], NORMAL), max(cut[u0 + 1], NORMAL)
                    c2, c3 = max(cut[u0 + 2], NORMAL), max(cut[u0 + 3], NORMAL)
                    t0, t1, t2, t3 = tau[0], tau[1], tau[2], tau[3]
                    for j in range(d_in):
                        p, m, wp, wm = pos[j], neg[j], wpos[j], wneg[j]
                        p, m, wp, wm = _keep(p, m, wp, wm, t0[j], w0, c0)
                        p, m, wp, wm = _keep(p, m, wp, wm, t1[j], w1, c1)
                        p, m, wp, wm = _keep(p, m, wp, wm, t2[j], w2, c2)
                        p, m, wp, wm = _keep(p, m, wp, wm, t3[j], w3, c3)
                        pos[j], neg[j], wpos[j], wneg[j] = p, m, wp, wm
                else:  # the block's last few updates
                    for g in range(n):
                        wu, cu, tg = np.float32(w[u0 + g]), max(cut[u0 + g], NORMAL), tau[g]
                        for j in range(d_in):
                            pos[j], neg[j], wpos[j], wneg[j] = _keep(pos[j], neg[j], wpos[j], wneg[j], tg[j], wu, cu)


def fold_block(acc: torch.Tensor, base: torch.Tensor, b: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
               cut: torch.Tensor, scale: float) -> None:  # fmt: skip
    """Add a block of updates' trimmed task vectors into ``acc`` (4, d_out, d_in): P, N, Wp, Wn, in place.

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
    flat_p, flat_n, flat_wp, flat_wn = acc[0].ravel(), acc[1].ravel(), acc[2].ravel(), acc[3].ravel()
    flat_base, flat_out = base.ravel(), out.ravel()
    lam32 = np.float32(lam)
    for e in numba.prange(flat_out.size):
        p, n = flat_p[e], flat_n[e]
        if p + n >= 0:  # the elected sign is + (a tie counts as +): the positive entries' sum and weight
            total, weight = p, flat_wp[e]
        else:
            total, weight = n, flat_wn[e]
        tau = total / weight if weight > 0 else np.float32(0)
        flat_out[e] = flat_base[e] + lam32 * tau


SIGN, TOP = np.uint32(0x7FFFFFFF), np.uint32(21)  # |x|'s bits; the radix select's first digit is bits 31-21


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _sampled(base_s, bt, at, rows, cols, scale, out):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover
    # out (n, c): |tau_u| at entry e
    d_r, c = bt.shape[1], bt.shape[2]
    s32 = np.float32(scale)
    n = rows.size
    chunk = 256
    for part in numba.prange((n + chunk - 1) // chunk):
        for e in range(part * chunk, min(n, (part + 1) * chunk)):
            bp, aq, be, t = bt[rows[e]], at[cols[e]], base_s[e], out[e]
            for u in range(c):  # vectorized over the updates: B_u[p, k] and A_u[k, q] are adjacent in u
                t[u] = bp[0, u] * aq[0, u]
            for k in range(1, d_r):
                bk, ak = bp[k], aq[k]
                for u in range(c):
                    t[u] += bk[u] * ak[u]
            for u in range(c):
                t[u] = abs(s32 * t[u] - be)


@numba.njit(parallel=True, cache=True, nogil=True)
def _first_digits(mag, hist):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover - compiled
    n, c = mag.shape
    bits, parts = mag.view(np.uint32), hist.shape[0]
    for part in numba.prange(parts):
        h = hist[part]
        for e in range(part * n // parts, (part + 1) * n // parts):
            row = bits[e]
            for u in range(c):
                h[(row[u] & SIGN) >> TOP, u] += 1


@numba.njit(cache=True, nogil=True)
def _select(pool, rank, prefix):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover - compiled
    """Finish a radix select below bit 21: the element of ``rank`` in ``pool`` (bits, all sharing ``prefix``)."""
    for shift, width in ((10, 11), (0, 10)):
        hist = np.zeros(1 << width, dtype=np.int64)
        mask, top = np.uint32((1 << width) - 1), np.uint32(shift)
        for x in pool:
            hist[(x >> top) & mask] += 1
        digit = 0
        while rank >= hist[digit]:
            rank -= hist[digit]
            digit += 1
        prefix |= np.uint32(digit) << top
        if shift:
            kept, j = np.empty(hist[digit], dtype=np.uint32), 0
            for x in pool:
                if (x >> top) == (prefix >> top):
                    kept[j] = x
                    j += 1
            pool = kept
    return prefix


@numba.njit(parallel=True, cache=True, nogil=True)
def _kth_largest(mag, hist, k, out):  # type: ignore[no-untyped-def]  # noqa: ANN001  # pragma: no cover - compiled; tested through kth_largest
    # |x| of finite float32s orders as its bit pattern: a radix select on bits 31-21, 20-10, 9-0, the
    # first digit's counts given (hist, per part), the rest on each column's entries in the chosen bin
    n, c = mag.shape
    bits = mag.view(np.uint32)
    counts = hist.sum(axis=0)  # (2048, c)
    rank0 = n - k  # the k-th largest is the element of 0-based rank n - k in ascending order
    digits, ranks, starts = np.empty(c, np.uint32), np.empty(c, np.int64), np.zeros(c + 1, np.int64)
    for u in range(c):
        rank, digit = rank0, 0
        while rank >= counts[digit, u]:
            rank -= counts[digit, u]
            digit += 1
        digits[u], ranks[u] = digit, rank
        starts[u + 1] = starts[u] + counts[digit, u]
    pools = np.empty(starts[c], dtype=np.uint32)
    halves = 2
    for half in numba.prange(halves):  # each column's entries in its bin: a pass over the rows per half of the columns
        lo, hi = half * c // halves, (half + 1) * c // halves
        fill = starts[lo:hi].copy()
        for e in range(n):
            row = bits[e]
            for u in range(lo, hi):
                x = row[u] & SIGN
                if (x >> TOP) == digits[u]:
                    pools[fill[u - lo]] = x
                    fill[u - lo] += 1
    for u in numba.prange(c):
        out[u] = _select(pools[starts[u] : starts[u + 1]], ranks[u], digits[u] << TOP)


def sampled_magnitudes(base: torch.Tensor, b: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       scale: float) -> torch.Tensor:  # fmt: skip
    """|tau_u[p, q]| = |s B_u[p] . A_u[:, q] - base[p, q]| at the given entries, (entries, c), without forming tau_u.

    B and A are transposed once per call to (d_out, r, c) and (d_in, r, c), so that for one entry the
    r products of every update of the block are contiguous: one vectorized pass over the updates per
    entry, for the 65,536 entries TIES's cut is taken on. Entry-major, as :func:`kth_largest` reads it.
    """
    c = b.shape[0]
    out = np.empty((rows.numel(), c), dtype=np.float32)
    bt = b.detach().to(torch.float32).permute(1, 2, 0).contiguous().numpy()
    at = a.detach().to(torch.float32).permute(2, 1, 0).contiguous().numpy()
    rows_, cols_ = rows.to(torch.int64).numpy(), cols.to(torch.int64).numpy()
    base_s = np.ascontiguousarray(_f32(base)[rows_, cols_])
    _launch(_sampled, base_s, bt, at, rows_, cols_, float(scale), out)
    return torch.from_numpy(out)


def kth_largest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Return the ``k``-th largest |x| of each column of an (n, c) tensor of finite floats, exactly, (c,).

    The same value as ``np.partition(abs(x), n - k, axis=0)[n - k]`` (a test checks it), by a
    three-level radix select on the float bits (a count of the first digit over the rows, then the
    second and third over one bin's entries), columns in parallel: several times faster than numpy's
    introselect, which runs on one thread. Not for NaN (which would order above infinity).
    """
    values = _f32(magnitude)
    n, c = values.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    hist = np.zeros((_threads(), 2048, c), dtype=np.int32)
    out = np.empty(c, dtype=np.uint32)
    _launch(_first_digits, values, hist)
    _launch(_kth_largest, values, hist, int(k), out)
    return torch.from_numpy(out.view(np.float32))


def merge(acc: torch.Tensor, base: torch.Tensor, lam: float) -> torch.Tensor:
    """Elect each entry's sign from ``acc``'s sums, take the disjoint mean, return ``base + lam * tau``.

    gamma = sign(P + N) (0 counts as +); tau = P / Wp if gamma = + else N / Wn, the agreeing updates'
    weighted mean; an entry no update kept stays at ``base``. One pass instead of torch's eight.
    """
    if acc.shape != (4, *base.shape) or not acc.is_contiguous() or acc.dtype != torch.float32:
        raise ValueError(f"acc must be contiguous float32 (4, *{tuple(base.shape)}), got {tuple(acc.shape)}")
    out = torch.empty(base.shape, dtype=torch.float32)
    args = (acc.numpy(), _f32(base), float(lam), out.numpy())
    _launch(_merge, *args)
    return out


def _threads() -> int:
    return max(1, min(int(numba.config.NUMBA_NUM_THREADS), torch.get_num_threads()))  # type: ignore[attr-defined]


def _launch(kernel: Any, *args: Any) -> None:
    """Run a compiled kernel on as many threads as torch uses (at most numba's limit), one launch at a time."""
    with _LAUNCH:
        numba.set_num_threads(_threads())
        kernel(*args)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()
