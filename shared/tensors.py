"""The adapter tensor codec: fp16 safetensors bytes out, strictly parsed fp32 tensors in (never pickle)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shared.errors import ReleaseError


def load_tensors(data: bytes, name: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into fp32 tensors, refusing anything malformed with a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise ReleaseError(f"{name} is not valid safetensors: {exc}") from None
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def save_tensors(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize tensors as fp16 safetensors bytes (what an adapter release carries)."""
    from safetensors.torch import save

    return save({k: v.detach().to(torch.float16).contiguous() for k, v in sorted(state.items())})
