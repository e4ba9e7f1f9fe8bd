"""Checks an update must pass before it counts: pure functions over tensors.

A rejected update is named with its reason; the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class RejectedUpdateError(ValueError):
    """An update failed a check; the message says which and why."""


def check_update(delta: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], weight: float) -> None:
    """Refuse an update whose keys, shapes, values or weight are not those of a valid adapter delta.

    Parameters
    ----------
    delta
        The client's adapter delta.
    expected
        The global adapter it was computed against (same keys, same shapes).
    weight
        The client's example count.
    """
    if not weight > 0:
        raise RejectedUpdateError(f"num-examples = {weight}, expected > 0")
    missing, extra = sorted(set(expected) - set(delta)), sorted(set(delta) - set(expected))
    if missing or extra:
        raise RejectedUpdateError(f"adapter keys do not match: missing {missing[:2]}, unexpected {extra[:2]}")
    for key, tensor in delta.items():
        if tensor.shape != expected[key].shape:
            raise RejectedUpdateError(f"{key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
        if not torch.isfinite(tensor).all():
            raise RejectedUpdateError(f"{key} has non-finite values")
