"""Client-side clipping (``dp.clipping = client``): a device's delta leaves it with L2 norm <= C, as decoded.

The bound must hold for what the coordinator decodes, not only for the float delta: the wire
encodings round (fp16 to 11 bits, q8 / q4 to a per-block grid, ``shared/wire.py``), and a rounded
entry can be a little larger than the clipped one. So the device encodes the clipped delta,
decodes it as the coordinator will, and shrinks it until the decoded norm is within C; the
coordinator then rejects any delta above C (``server/privacy/``) instead of trusting the device.
Needed under secure aggregation, where the coordinator never sees one device's delta.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from shared.clipping import clip, update_norm
from shared.wire import pack, unpack

MAX_SHRINKS = 16  # each shrink takes the decoded norm below C unless rounding moved it by more than 1e-3


def clip_and_pack(delta: Mapping[str, torch.Tensor], clip_norm: float, encoding: str) -> tuple[Any, float, bool]:
    """Return the delta clipped to ``clip_norm``, packed in ``encoding``; its norm before; whether it was clipped.

    Raises
    ------
    ValueError
        If no shrink brings the decoded norm within the bound (it does not happen for finite deltas).
    """
    clipped, norm = clip(delta, clip_norm)
    shapes = {k: tuple(v.shape) for k, v in clipped.items()}
    for _ in range(MAX_SHRINKS):
        record = pack(clipped, encoding)
        decoded = update_norm(unpack(record, shapes, encoding))
        if decoded <= clip_norm:
            return record, norm, norm > clip_norm
        clipped = {k: v * (clip_norm / decoded * (1 - 1e-3)) for k, v in clipped.items()}
    raise ValueError(f"the {encoding} encoding of the clipped delta stays above the clip norm {clip_norm}")
