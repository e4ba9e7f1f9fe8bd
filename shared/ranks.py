"""Devices of different LoRA rank in one fleet: truncation on the device, zero-padding on the coordinator.

The run's ``lora.rank`` r is the global rank: every signed release is one rank-r adapter. A device
may train at a rank r_i <= r (its node config ``lora-rank``, ``client/capability.py``). For each
module, with the global factors A (r, d_in), B (d_out, r) and the run's scale s = alpha / r:

* the device verifies the full release, then keeps its first r_i components (HetLoRA, Cho et
  al. 2024, arXiv 2401.06432): A_i0 = A[:r_i], B_i0 = B[:, :r_i], and trains them at the same
  scale s (PEFT's ``lora_alpha`` = alpha * r_i / r). When the release was re-factored by SVD
  (``exact``, ``ties``: B = U sqrt(S), A = sqrt(S) V^T, components in descending singular value),
  the first r_i components are the best rank-r_i approximation of s B A (Eckart-Young), as
  FlexLoRA (Bai et al. 2024, arXiv 2402.11505) truncates;
* it uploads its delta (dA_i, dB_i) at rank r_i and says so (metric ``lora-rank``);
* the coordinator zero-pads the delta to rank r (:func:`pad`). The device's implied full-rank
  factors are the global's with its r_i components moved, so for every aggregation method its
  contribution in product space is exactly the global plus the device's own change:

      s (B + pad dB_i)(A + pad dA_i) = s B A + s [(B_i0 + dB_i)(A_i0 + dA_i) - B_i0 A_i0],

  because the padded columns of dB_i and rows of dA_i are zero. A low-rank device therefore never
  pulls the global's other components toward zero (the "rank collapse" of aggregating each
  device's truncated product, raFLoRA, arXiv 2602.13486): what it did not train, it leaves as is.

Keys are PEFT's (``<module>.lora_A.weight``, ``<module>.lora_B.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch at run time only where a tensor is made: an edge device's client/verify.py imports this
    import torch

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def rank_of(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Return the one LoRA rank of an adapter's tensors (rows of A, columns of B); ValueError if they disagree."""
    if not shapes or any(len(shape) != 2 for shape in shapes.values()):
        raise ValueError("an adapter's LoRA factors are matrices, and it has at least one")
    ranks = {shape[0] if key.endswith(LORA_A) else shape[1] for key, shape in shapes.items()}
    if len(ranks) != 1:
        raise ValueError(f"the adapter's tensors have {len(ranks)} ranks {sorted(ranks)[:4]}, expected one")
    return ranks.pop()


def rank_shapes(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """Return the shapes of the same adapter at ``rank``: A (rank, d_in), B (d_out, rank)."""
    return {k: (rank, s[1]) if k.endswith(LORA_A) else (s[0], rank) for k, s in shapes.items()}


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Return the adapter's first ``rank`` components: A[:rank], B[:, :rank] (copies, contiguous).

    Raises
    ------
    ValueError
        If ``rank`` is not in [1, the adapter's rank].
    """
    full = rank_of({k: tuple(v.shape) for k, v in state.items()})
    if not 1 <= rank <= full:
        raise ValueError(f"cannot keep {rank} components of a rank-{full} adapter")
    return {k: (v[:rank] if k.endswith(LORA_A) else v[:, :rank]).clone().contiguous() for k, v in state.items()}


def pad(delta: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Zero-pad a lower-rank delta to the full ``shapes`` (the components it did not train are unchanged).

    Raises
    ------
    ValueError
        If the keys differ or a tensor does not fit its full shape as a leading slice.
    """
    import torch

    if set(delta) != set(shapes):
        raise ValueError("the delta's keys do not match the adapter's")
    out = {}
    for key, shape in shapes.items():
        part = delta[key]
        if part.dim() != 2 or any(p > s for p, s in zip(part.shape, shape, strict=True)):
            raise ValueError(f"{key}: a {tuple(part.shape)} delta does not fit {shape}")
        full = torch.zeros(shape, dtype=part.dtype)
        full[: part.shape[0], : part.shape[1]] = part
        out[key] = full
    return out
