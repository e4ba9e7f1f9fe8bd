"""Block-wise 4-bit weights: one format for the server's quantizer, the device's trainer and ONNX Runtime.

A weight W (N out x K in) is cut along K into blocks of ``BLOCK`` = 32 values. Each block keeps
an fp16 ``scale`` s and an fp16 ``min`` m, and 4-bit codes q in 0..15 (QLoRA-style frozen base,
asymmetric like GGUF's Q4_1)::

    W[n, k] = s[n, b] * q[n, k] + m[n, b],      b = k // 32

Codes are packed two per byte, low nibble first along K, shape (N, K/32, 16): exactly the
``B`` input of ONNX Runtime's ``MatMulNBits`` (bits=4, block_size=32), whose dequantization
``(q - zp) * s`` is the same affine map with a float zero point ``zp = -m / s``. So the codes a
device trains against are the codes it serves.

Why this scheme: the embedded SmolLM2 was published as Q4_1 (blocks of 32 along K, fp16 scale
and min). Min/max quantization of its dequantized weights recovers those very codes, scales
and mins: quantizing it again adds no error (tests check this). A symmetric or NF4 grid would
round a second time.

The embedding (tied to the output layer; Q8_0 in the source) is kept as symmetric 8-bit blocks
of 32 (``W = s * q``, q in -127..127), which likewise recovers its source codes exactly.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 32


def quantize4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize (N, K) weights; return packed codes (N, K/32, 16) uint8, scales and mins (N, K/32) fp16."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of the block size {BLOCK}")
    blocks = w.detach().to(torch.float32).reshape(n, k // BLOCK, BLOCK)  # (N, K/32, 32)
    lo, hi = blocks.amin(dim=2), blocks.amax(dim=2)
    flat = torch.where(lo != 0, lo.abs(), torch.ones_like(lo))  # a constant block: any s > 0 keeps zp = -m / s finite
    scales = torch.where(hi > lo, (hi - lo) / 15, flat).to(torch.float16)
    mins = lo.to(torch.float16)
    step = scales.to(torch.float32).clamp(min=torch.finfo(torch.float16).tiny)[..., None]
    codes = ((blocks - mins.to(torch.float32)[..., None]) / step).round().clamp(0, 15).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scales, mins


def dequantize4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return W = s * q + m as (N, K) in ``dtype``."""
    n, kb, _ = packed.shape
    # one table lookup unpacks a byte into its two codes, already in ``dtype`` (3x faster than shifts + casts)
    codes = torch.nn.functional.embedding(packed.int(), _nibble_table(dtype)).view(n, kb, BLOCK)  # (N, K/32, 32)
    return codes.mul_(scales.to(dtype)[..., None]).add_(mins.to(dtype)[..., None]).view(n, kb * BLOCK)


@functools.lru_cache(maxsize=4)
def _nibble_table(dtype: torch.dtype) -> torch.Tensor:
    """(256, 2): byte -> (low nibble, high nibble)."""
    byte = torch.arange(256)
    return torch.stack((byte & 0x0F, byte >> 4), dim=1).to(dtype)


def quantize8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit blocks of 32 along the last dim: codes (N, K/32, 32) int8, scales (N, K/32) fp16."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"dimension {k} is not a multiple of the block size {BLOCK}")
    blocks = w.detach().to(torch.float32).reshape(n, k // BLOCK, BLOCK)
    scales = (blocks.abs().amax(dim=2) / 127).to(torch.float16)
    step = scales.to(torch.float32).clamp(min=torch.finfo(torch.float16).tiny)[..., None]
    return (blocks / step).round().clamp(-127, 127).to(torch.int8), scales


def dequantize8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return W = s * q as (N, K) in ``dtype``."""
    n, kb, _ = codes.shape
    return codes.to(dtype).mul_(scales.to(dtype)[..., None]).reshape(n, kb * BLOCK)  # in place: one (N, K) copy


def matmulnbits_zero_points(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Float zero points for ``MatMulNBits``: ``(q - zp) * s == s * q + m`` with ``zp = -m / s``."""
    return -mins.to(torch.float32) / scales.to(torch.float32)  # scales are > 0 by construction
