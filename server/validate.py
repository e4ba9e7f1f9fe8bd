"""Checks an update must pass before it counts: pure functions over tensors and numbers.

A rejected update is named with its reason; the round goes on with the others.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import TypeVar

import torch

from shared.wire import encoded_bytes

Key = TypeVar("Key")
MIN_FOR_NORM_RULE = 2  # with two, the one more than max-ratio x the other is the outlier
MAX_ADAPTER_VALUE = 1e4  # no value of a signed adapter is larger (fp16 saturates at 65504; LoRA factors are O(1))


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


def contribution_norms(norms: Mapping[Key, float], weights: Mapping[Key, float]) -> dict[Key, float]:
    """Each update's weighted contribution, ``w_i / median(w) * ||delta_i||``, on the scale of an update norm.

    The weight is part of the contribution: a client claiming a huge example count with an
    ordinary-sized delta moves the aggregate as much as one sending a huge delta, so the
    outlier rule must see both. Dividing by the median weight keeps the figure a norm.
    """
    median = statistics.median(weights.values())
    return {key: weights[key] / median * norms[key] for key in norms}


def norm_outliers(norms: Mapping[Key, float], max_ratio: float) -> dict[Key, str]:
    """Name the updates whose (weighted) norm exceeds ``max_ratio`` x the median of the *other* updates.

    A robust rule in the spirit of norm bounding (Sun et al., 2019, arXiv 1911.07963), with the
    bound taken from the round itself: the median of the others is unmoved by one outlier, and,
    unlike the median of all, says which of two updates is the outlier: with two updates, one
    more than ``max_ratio`` x the other is refused (the round then has one update left, which
    ``aggregation.min-accepted`` decides on). Applied from ``MIN_FOR_NORM_RULE`` updates on.

    Returns
    -------
    dict
        Key of ``norms`` -> reason, for each outlier.
    """
    if len(norms) < MIN_FOR_NORM_RULE:
        return {}
    found = {}
    for key, norm in norms.items():
        others = statistics.median(v for k, v in norms.items() if k != key)
        if not norm <= max_ratio * others:  # also catches NaN
            found[key] = f"update norm {norm:.4g} is more than {max_ratio:g}x the median {others:.4g} of the others"
    return found


def check_aggregate(state: Mapping[str, torch.Tensor], bound: float = MAX_ADAPTER_VALUE) -> None:
    """Refuse an aggregate that is not finite or not in range, before it is signed.

    The release stores fp16 (largest finite value 65504): a value beyond ``bound`` would be
    infinite, or nearly so, once saved, and every device would load it. LoRA factors are O(1).
    """
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise RejectedUpdateError(f"the aggregate's {key} has non-finite values")
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if peak > bound:
            raise RejectedUpdateError(f"the aggregate's {key} reaches |{peak:.4g}|, beyond the bound {bound:g}")
