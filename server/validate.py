"""Checks an update must pass before it counts: pure functions over tensors and numbers.

A rejected update is named with its reason; the round goes on with the others.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import TypeVar

import torch

from shared.wire import encoded_bytes

K = TypeVar("K")
MIN_FOR_NORM_RULE = 3  # a median of fewer updates says nothing about which one is the outlier


class RejectedUpdateError(ValueError):
    """An update failed a check; the message says which and why."""


def check_size(nbytes: int, shapes: Mapping[str, tuple[int, ...]], encoding: str) -> None:
    """Refuse a payload larger than an honest update of ``shapes`` in ``encoding`` can be.

    Checked before anything is decoded, so an oversized upload costs no decoding work.
    """
    limit = encoded_bytes(shapes, encoding)
    if nbytes > limit:
        raise RejectedUpdateError(f"update is {nbytes:,} bytes, more than the {limit:,} of an {encoding} delta")


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


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update, all tensors together."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in delta.values()])))


def norm_outliers(norms: Mapping[K, float], max_ratio: float) -> dict[K, str]:
    """Name the updates whose norm exceeds ``max_ratio`` x the median norm of the round.

    A robust rule in the spirit of norm bounding (Sun et al., 2019, arXiv 1911.07963), with the
    bound taken from the round itself: the median is unmoved by a minority of outliers. Applied
    from ``MIN_FOR_NORM_RULE`` updates on.

    Returns
    -------
    dict
        Key of ``norms`` -> reason, for each outlier.
    """
    if len(norms) < MIN_FOR_NORM_RULE:
        return {}
    median = statistics.median(norms.values())
    bound = max_ratio * median
    return {
        key: f"update norm {norm:.4g} is more than {max_ratio:g}x the round's median {median:.4g}"
        for key, norm in norms.items()
        if norm > bound
    }
