"""SecAgg+ parameters: share count, reconstruction threshold, quantization range and modulus, checked once.

The protocol (Bell et al., CCS 2020, arXiv 2002.04156; Flower 1.41's ``SecAggPlusWorkflow``) sums
integer vectors modulo ``M``. Each device maps every coordinate of its (clipped) delta from
``[-c, c]`` to an integer code in ``[0, L]`` with Flower's stochastic quantizer
(``flwr.common.secure_aggregation.quantization.quantize``)::

    q(x) = ceil_or_floor((clip(x, -c, c) + c) * L / (2c))     unbiased: E[q(x)] = (x + c) L / (2c)

so the coordinator's unmasked sum over ``n`` survivors is ``S = sum_i q(x_i)`` in ``[0, n L]``.
No sum overflows the modulus, i.e. ``S mod M == S``, as long as ``n L < M``; with at most
``max_devices = N`` devices per round this is guaranteed by ``N L < M``, so by default
``L = (M - 1) // N``. Dequantizing (Flower's ``dequantize``, then an offset)::

    sum_i x_i ~= S * 2c / L - n c

with an error below ``n * 2c / L`` per coordinate (each device's rounding moves its code by less
than one step ``2c / L``), and zero mean. ``c`` comes from the DP clip norm ``C``
(``dp.clipping = client``: ``||x||_2 <= C`` so every ``|x_j| <= C`` and nothing is clipped twice)
or a configured bound (then each coordinate is clipped to ``[-c, c]`` on the device). After
rounding a clipped delta's norm can grow by at most ``sqrt(d) * 2c / L`` (``d`` entries): the
sensitivity DP must assume is :func:`sensitivity`.

Shamir threshold ``t`` of ``s`` shares: each device splits two secrets (its private-mask seed and
its pairwise-mask key) into ``s`` shares and, in the unmask stage, reveals for each neighbour
*either* the seed share (neighbour survived) *or* the key share (neighbour dropped), never both.
With ``t > s / 2`` no coordinator can collect ``t`` shares of both secrets of one device (that
would need ``2t > s`` answers), which is what keeps a survivor's delta hidden; ``t <= s`` so the
secrets can be rebuilt at all. The masks of up to ``s - t`` dropped neighbours can be removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.config_aggregation import MAX_SECURE_SHARES

MAX_MODULUS = 1 << 32  # shared/secagg_prg.py draws masks as uint32 words (mod M)
MIN_SHARES = 3  # as Flower's workflow: 2 shares would let one neighbour hold everything
MAX_DEVICES = 100_000  # bounds every per-round list before it is allocated


class SecAggConfigError(ValueError):
    """Secure-aggregation parameters the protocol cannot honour; the message names the value."""


@dataclass(frozen=True)
class SecAggParams:
    """What the coordinator runs SecAgg+ with (proposed run-config keys ``aggregation.secure-*``)."""

    num_shares: int = 5
    """``s``: shares of each device's secrets, one per neighbour and itself (odd: a ring of ``s // 2`` either side)."""
    threshold: int = 3
    """``t``: shares that rebuild a secret; ``s // 2 + 1 <= t <= s`` (see the module docstring)."""
    clip_range: float = 1.0
    """``c``: every coordinate is quantized from ``[-c, c]``; the DP clip norm ``C`` under ``dp.clipping = client``."""
    max_devices: int = 1000
    """``N``: most devices one round may sum; a larger sample is refused (``N L < M``)."""
    modulus: int = MAX_MODULUS
    """``M``: a power of two, at most 2**32 (the range of Flower's mask generator)."""
    levels: int = 0
    """``L``: the quantization grid's top code; 0 = the largest that ``N`` devices cannot overflow."""
    timeout: float = 600.0
    """Seconds each stage waits for replies; a device that has not answered by then counts as dropped."""

    def __post_init__(self) -> None:
        s, t = self.num_shares, self.threshold
        why = f"must be an odd integer in [{MIN_SHARES}, {MAX_SECURE_SHARES}]"
        _check(isinstance(s, int) and MIN_SHARES <= s <= MAX_SECURE_SHARES and s % 2 == 1, "num-shares", s, why)
        _check(isinstance(t, int) and s // 2 + 1 <= t <= s, "threshold", t, f"must be in [{s // 2 + 1}, {s}]")
        _check(math.isfinite(self.clip_range) and self.clip_range > 0, "clip-range", self.clip_range, "must be > 0")
        n, m = self.max_devices, self.modulus
        _check(isinstance(n, int) and 2 <= n <= MAX_DEVICES, "max-devices", n, f"must be in [2, {MAX_DEVICES}]")
        _check(isinstance(m, int) and 2 <= m <= MAX_MODULUS and m & (m - 1) == 0, "modulus", m, "must be 2**k <= 2**32")
        _check(isinstance(self.levels, int) and self.levels >= 0, "levels", self.levels, "must be >= 0")
        _check(n * self.quant_levels < m, "levels", self.quant_levels, f"times max-devices {n} must be < {m}")
        _check(self.quant_levels >= 2, "levels", self.quant_levels, "must be >= 2 (raise modulus or lower max-devices)")
        _check(math.isfinite(self.timeout) and self.timeout > 0, "timeout", self.timeout, "must be > 0")

    @property
    def quant_levels(self) -> int:
        """``L``: the configured top code, or ``(M - 1) // N``."""
        return self.levels or (self.modulus - 1) // self.max_devices

    @property
    def step(self) -> float:
        """One quantization step ``2c / L``: a device's rounding error per coordinate is below it."""
        return 2 * self.clip_range / self.quant_levels

    def for_round(self, sampled: int) -> tuple[int, int]:
        """Return the round's ``(shares, threshold)`` for ``sampled`` devices.

        Fewer devices than ``num_shares``: every device is every other's neighbour (``sampled`` shares).

        Raises
        ------
        SecAggConfigError
            If ``sampled`` is below the threshold or above ``max_devices`` (the sum could overflow).
        """
        if not self.threshold <= sampled <= self.max_devices:
            raise SecAggConfigError(
                f"secure aggregation needs between threshold = {self.threshold} and max-devices = "
                f"{self.max_devices} sampled devices, got {sampled}"
            )
        return min(self.num_shares, sampled), self.threshold


def sensitivity(params: SecAggParams, entries: int) -> float:
    """L2 bound of one device's dequantized contribution: ``c`` plus its rounding, ``sqrt(d) * 2c / L``.

    Under DP the noise is calibrated for the clip norm ``C = c``; this says by how little more a
    rounded contribution can move the sum (an adapter of 2.44M entries, N = 1000, M = 2**32:
    ``C + 7.3e-4 C``).
    """
    return params.clip_range + math.sqrt(entries) * params.step


def _check(ok: bool, key: str, value: object, what: str) -> None:
    if not ok:
        raise SecAggConfigError(f"aggregation.secure-{key} = {value!r}: {what}")
