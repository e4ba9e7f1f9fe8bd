"""The Gaussian mechanism of DP-FedAvg (McMahan et al., 2018, arXiv 1710.06963), over adapter deltas.

Each device's delta (all uploaded tensors together) is clipped to L2 norm C ("flat clipping"),
the clipped deltas are summed with uniform weights and divided by a *fixed* denominator m (the
expected number of sampled devices, not the number that replied: then one device changes the
mean by at most C / m whoever else replied), and Gaussian noise of standard deviation z C / m is
added to every entry once per round::

    global' = global + (1/m) * sum_i delta_i * min(1, C / ||delta_i||) + N(0, (z C / m)^2 I)

The noise std is Flower's ``compute_stdv`` (``flwr.supercore.differential_privacy``); the clipping
and the noise are ours because our deltas are ``dict[str, Tensor]`` in float32, not Flower's
NumPy ``Parameters``, and the noise must come from a generator seeded by the OS.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

import torch
from flwr.supercore.differential_privacy import compute_stdv

from shared.clipping import State, clip, update_norm

__all__ = ["State", "clip", "dp_mean", "noise_std", "os_generator", "update_norm"]


def noise_std(noise_multiplier: float, clip_norm: float, expected_clients: float) -> float:
    """Return the noise's standard deviation per entry, z C / m (Flower's ``compute_stdv``)."""
    return compute_stdv(noise_multiplier, clip_norm, expected_clients)  # type: ignore[arg-type]


def os_generator() -> torch.Generator:
    """Return a torch generator seeded with 63 fresh bits from the OS (never the run's seed: it is public)."""
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63))
    return gen


def dp_mean(
    global_: Mapping[str, torch.Tensor],
    keys: Iterable[str],
    deltas: Iterable[Mapping[str, torch.Tensor]],
    expected_clients: float,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator,
) -> State:
    """Return the new global: ``global_`` plus the noised, fixed-denominator mean of the clipped ``deltas``.

    ``keys`` are the uploaded tensors, a subset of ``global_``'s (FFA-LoRA: only the B factors);
    the others are returned as they were. ``deltas`` are already clipped to ``clip_norm``
    (``shared.clipping.clip``, on the server or the device) and hold exactly ``keys``. Noise is drawn in
    float32 from ``generator``, one draw per entry of every key, once per call.
    """
    if expected_clients <= 0:
        raise ValueError(f"the expected number of clients must be > 0, got {expected_clients}")
    total = {k: torch.zeros(global_[k].shape, dtype=torch.float32) for k in keys}
    for delta in deltas:
        if set(delta) != set(total):
            raise ValueError("a delta's tensors are not the round's uploaded tensors")
        for key, value in delta.items():
            total[key] += value.float()
    std = noise_std(noise_multiplier, clip_norm, expected_clients)
    out = {k: v.float().clone() for k, v in global_.items()}
    for key, value in total.items():
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32) * std
        out[key] += value / expected_clients + noise
    return out
