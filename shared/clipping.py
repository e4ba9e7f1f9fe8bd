"""The L2 norm of an adapter delta and its clipping to a bound: what device and coordinator must agree on.

Flat clipping of DP-FedAvg (McMahan et al., 2018, arXiv 1710.06963): the delta's tensors are one
vector, scaled by ``min(1, C / ||delta||)``. A device clips before it uploads (``dp.clipping =
client``), the coordinator otherwise (``server/privacy/mechanism.py``); both use this code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update, all tensors together (in float64)."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in delta.values()])))


def clip(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[State, float]:
    """Return ``delta`` in float32 scaled to L2 norm at most ``clip_norm``, and its norm before.

    The scale ``C / norm`` is shrunk by a millionth so that float32 rounding cannot take the
    result's norm, computed again, above C.
    """
    norm = update_norm(delta)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm * (1 - 1e-6)
    return {k: v.float() * scale for k, v in delta.items()}, norm
