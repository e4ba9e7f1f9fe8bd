"""Adapter tensors on the wire: Flower ``ArrayRecord`` encodings both sides agree on.

* Down, the global adapter travels as its signed release (``shared/release_records.py``): the
  exact bytes of its PEFT files, with the manifest and signature in the message's config.
* ``fp16`` (the default for a client's delta): one fp16 array per tensor.
  Flower rejects bf16; fp16 halves fp32 with ample precision for LoRA factors and updates.
* ``q8`` / ``q4``: block-wise symmetric quantization of a client's *delta* (what goes up).
  A tensor is flattened and cut into blocks of ``BLOCK`` values (the last one zero-padded);
  each block keeps one fp16 scale ``s = max|x| / q_max`` and integer codes
  ``c = round(x / s)`` in ``[-q_max, q_max]`` (127 for 8 bits, 7 for 4 bits), so
  ``x ~= s * c`` with an error of at most ``s / 2`` per value. 4-bit codes are stored as two
  per byte (``c + 8``, low nibble first). Bytes per value: 1.03 (q8) and 0.53 (q4) vs 2 (fp16).

A quantized tensor ``key`` travels as ``key`` (codes: int8 for q8, uint8 for q4, shape
``(blocks, BLOCK)`` or ``(blocks, BLOCK // 2)``) plus ``key + SCALE_SUFFIX`` (fp16, ``(blocks,)``).
Decoding needs the expected shapes (the receiver's own adapter) and refuses anything else.
Arithmetic on the receiving side is fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from shared.config import DELTA_ENCODINGS as ENCODINGS

BLOCK = 64
SCALE_SUFFIX = "#scale"
NPY_HEADER_MAX = 192  # numpy pads the v1 header to a multiple of 64 bytes; 128 for any adapter shape
_QMAX = {"q8": 127, "q4": 7}

State = dict[str, torch.Tensor]


class WireError(ValueError):
    """A record does not hold what the receiver expects; the message says what differs."""


def pack(state: Mapping[str, torch.Tensor], encoding: str = "fp16") -> Any:
    """Pack tensors into a Flower ``ArrayRecord`` in ``encoding`` (see the module docstring)."""
    from flwr.app import Array, ArrayRecord

    _check_encoding(encoding)
    arrays: dict[str, Any] = {}
    for key, tensor in state.items():
        if encoding == "fp16":
            arrays[key] = Array(tensor.detach().to(torch.float16).contiguous().numpy())
            continue
        codes, scales = _quantize(tensor.detach().to(torch.float32).flatten(), _QMAX[encoding])
        if encoding == "q4":
            codes = _pack_nibbles(codes)
        arrays[key] = Array(codes.numpy())
        arrays[key + SCALE_SUFFIX] = Array(scales.numpy())
    return ArrayRecord(arrays)


def unpack(record: Any, shapes: Mapping[str, tuple[int, ...]], encoding: str = "fp16") -> State:
    """Unpack a record of ``encoding`` into fp32 tensors of exactly ``shapes``.

    Raises
    ------
    WireError
        Naming the first key that is missing or unexpected, or whose dtype, shape or scales
        do not fit ``encoding``.
    """
    _check_encoding(encoding)
    names = set(shapes) if encoding == "fp16" else {n for k in shapes for n in (k, k + SCALE_SUFFIX)}
    missing, extra = sorted(names - set(record.keys())), sorted(set(record.keys()) - names)
    if missing or extra:
        raise WireError(f"{encoding} record keys do not match: missing {missing[:2]}, unexpected {extra[:2]}")
    return {key: _decode_one(record, key, tuple(shape), encoding) for key, shape in shapes.items()}


def encoded_bytes(shapes: Mapping[str, tuple[int, ...]], encoding: str) -> int:
    """Most bytes an honest record of tensors of ``shapes`` in ``encoding`` takes on the wire.

    Tensor data plus, per array, the ``.npy`` header Flower's ``Array`` carries (128 bytes for
    the shapes of an adapter, at most ``NPY_HEADER_MAX``).
    """
    _check_encoding(encoding)
    total = 0
    for shape in shapes.values():
        n = math.prod(shape)
        blocks = -(-n // BLOCK)
        if encoding == "fp16":
            total += 2 * n + NPY_HEADER_MAX
        else:
            total += blocks * (BLOCK if encoding == "q8" else BLOCK // 2) + 2 * blocks + 2 * NPY_HEADER_MAX
    return total


def to_wire(state: Mapping[str, torch.Tensor]) -> Any:
    """Pack a full adapter (the global one) as fp16."""
    return pack(state, "fp16")


def from_wire(record: Any) -> State:
    """Unpack an fp16 record (the global adapter) into fp32 tensors, whatever its keys."""
    for key, arr in record.items():
        if arr.dtype != "float16":
            raise WireError(f"{key} arrived as {arr.dtype}, expected float16")
    return {k: torch.from_numpy(arr.numpy().copy()).to(torch.float32) for k, arr in record.items()}


def wire_bytes(record: Any) -> int:
    """Payload bytes of an ``ArrayRecord`` (what the round moves per client, per direction)."""
    return sum(len(arr.data) for arr in record.values())


def _decode_one(record: Any, key: str, shape: tuple[int, ...], encoding: str) -> torch.Tensor:
    n = math.prod(shape)
    blocks = -(-n // BLOCK)
    if encoding == "fp16":
        return torch.from_numpy(_array(record, key, "float16", shape)).to(torch.float32)
    code_shape = (blocks, BLOCK if encoding == "q8" else BLOCK // 2)
    codes = torch.from_numpy(_array(record, key, "int8" if encoding == "q8" else "uint8", code_shape))
    scales = torch.from_numpy(_array(record, key + SCALE_SUFFIX, "float16", (blocks,))).to(torch.float32)
    if not (torch.isfinite(scales).all() and (scales >= 0).all()):
        raise WireError(f"{key}{SCALE_SUFFIX} holds negative or non-finite scales")
    if encoding == "q4":
        codes = _unpack_nibbles(codes)
    if codes.to(torch.int16).abs().max() > _QMAX[encoding]:
        raise WireError(f"{key} holds codes outside [-{_QMAX[encoding]}, {_QMAX[encoding]}]")
    values = codes.to(torch.float32) * scales[:, None]  # (blocks, BLOCK)
    return values.flatten()[:n].reshape(shape)


def _array(record: Any, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode ``record[key]`` as a ``dtype`` array of exactly ``shape``, or raise :class:`WireError`.

    Flower's ``Array`` carries declared metadata (dtype, shape) beside ``.npy`` bytes that a sender
    writes freely: both are checked, the bytes' size before they are parsed, and the parsed array
    again, so a payload whose bytes disagree with its metadata is refused, never half-decoded.
    """
    arr = record[key]
    if arr.dtype != dtype or tuple(arr.shape) != shape:
        raise WireError(f"{key} arrived as {arr.dtype} {tuple(arr.shape)}, expected {dtype} {shape}")
    limit = math.prod(shape) * np.dtype(dtype).itemsize + NPY_HEADER_MAX
    if len(arr.data) > limit:
        raise WireError(f"{key} carries {len(arr.data):,} bytes, more than the {limit:,} of {dtype} {shape}")
    try:
        values = arr.numpy()
    except Exception as exc:  # noqa: BLE001 (numpy's .npy reader raises many kinds on hostile bytes)
        raise WireError(f"{key} is not a valid .npy array ({type(exc).__name__}: {str(exc)[:200]})") from None
    if values.dtype != np.dtype(dtype) or values.shape != shape:
        raise WireError(f"{key}'s bytes hold {values.dtype} {values.shape}, not the declared {dtype} {shape}")
    return np.ascontiguousarray(values).copy()


def _quantize(flat: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return int8 codes (blocks, BLOCK) and fp16 scales (blocks,) of a flat fp32 tensor."""
    pad = -flat.numel() % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, BLOCK)  # (blocks, BLOCK)
    scales = (blocks.abs().amax(dim=1) / qmax).to(torch.float16)
    # divide by the scale the receiver multiplies by (fp16, subnormal for small deltas): a floor on
    # it here shrank every block below 127 * 6.1e-5 (q8) toward zero, and a small clipped DP delta to 0
    stored = scales.to(torch.float32)[:, None]
    codes = (blocks / torch.where(stored > 0, stored, 1.0)).round().clamp(-qmax, qmax).to(torch.int8)
    return codes, scales


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(blocks, BLOCK) int8 codes in [-7, 7] -> (blocks, BLOCK // 2) uint8, low nibble first."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_nibbles` (returns int16 codes)."""
    low, high = (packed & 0x0F).to(torch.int16) - 8, (packed >> 4).to(torch.int16) - 8
    return torch.stack((low, high), dim=2).flatten(1)


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise WireError(f"unknown wire encoding '{encoding}', expected one of {ENCODINGS}")
