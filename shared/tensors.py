"""The adapter tensor codec: fp16 safetensors bytes out, strictly parsed fp32 tensors in (never pickle).

Two views of the same parse: :func:`load_tensors` gives torch tensors (training, aggregation),
:func:`load_arrays` numpy arrays (the edge runtime, which has no torch). Each imports its
framework only when called, so importing this module costs neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from shared.errors import ReleaseError

if TYPE_CHECKING:
    import numpy as np
    import torch

_NAME = "adapter_model.safetensors"


def _parse(data: bytes, name: str, load: Callable[[bytes], dict[str, Any]]) -> dict[str, Any]:
    """Run a safetensors ``load`` on ``data``; any malformation is a :class:`ReleaseError` naming ``name``."""
    from safetensors import SafetensorError

    try:
        return load(data)
    except (
        SafetensorError,
        ValueError,
        RuntimeError,
        OverflowError,
        TypeError,
        KeyError,
    ) as exc:  # KeyError: bf16 in numpy
        raise ReleaseError(f"{name} is not valid safetensors: {exc}") from None


def load_tensors(data: bytes, name: str = _NAME) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into fp32 torch tensors, refusing anything malformed with a clear error."""
    import torch
    from safetensors.torch import load

    return {k: v.to(torch.float32) for k, v in _parse(data, name, load).items()}


def load_arrays(data: bytes, name: str = _NAME) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into fp32 numpy arrays (no torch), refusing anything malformed with a clear error.

    numpy has no bfloat16: a bf16 tensor is refused here by name (an adapter release is fp16).
    """
    import numpy as np
    from safetensors.numpy import load

    arrays = _parse(data, name, load)
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise ReleaseError(f"{name}: tensor {key!r} is {value.dtype}, not a floating-point tensor")
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def as_array(value: Any) -> np.ndarray:
    """Return a numpy view of a tensor, torch (detached, on the CPU) or numpy alike, without importing torch."""
    import numpy as np

    return np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)


def save_tensors(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize tensors as fp16 safetensors bytes (what an adapter release carries)."""
    import torch
    from safetensors.torch import save

    return save({k: v.detach().to(torch.float16).contiguous() for k, v in sorted(state.items())})
