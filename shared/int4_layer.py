"""The frozen 4-bit linear layer a device trains LoRA on (QLoRA, Dettmers et al., 2023, arXiv 2305.14314).

    y = x W^T,   W = dequantize(codes, scales, mins)   (``shared/int4.py``)

W is rebuilt block by block in the compute dtype for the matmul of the forward pass and again
for the backward pass, and dropped right after: only the 4-bit codes stay in memory (0.625
bytes per weight with scales and mins), never a float copy. The base gets no gradient; LoRA
(peft) wraps this layer like an ``nn.Linear`` and trains its A and B on top.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.files import read_bounded
from shared.int4 import BLOCK, dequantize4, dequantize8, quantize4

INT4_WEIGHTS, QUANT_CONFIG = "model.int4.safetensors", "quantization.json"  # the artifact's file names
MAX_QUANT_CONFIG_BYTES = 1 << 16  # quantization.json: a scheme, bits, block size


class _Int4MatMul(torch.autograd.Function):
    """x @ W^T with W dequantized on the fly in forward and backward; no gradient for W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                keep: bool, product: bool) -> Any:  # fmt: skip
        weight = dequantize4(codes, scales, mins, x.dtype)  # (N, K)
        ctx.save_for_backward(*((weight,) if keep else (codes, scales, mins)))
        if not product:  # its value is never read (skip_output_when); the backward pass is the same
            return x.new_zeros((*x.shape[:-1], weight.shape[0]))
        return torch.nn.functional.linear(x, weight)  # (..., N)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        saved = ctx.saved_tensors
        weight = saved[0] if len(saved) == 1 else dequantize4(saved[0], saved[1], saved[2], grad.dtype)
        return grad @ weight.to(grad.dtype), None, None, None, None, None  # (..., K)


class Int4Linear(nn.Module):
    """A frozen linear layer stored as 4-bit codes; computes in the input's dtype."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        super().__init__()
        self.out_features, blocks, half = codes.shape
        self.in_features = blocks * half * 2
        self.register_buffer("qweight", codes)  # (N, K/32, 16) uint8; peft finds the device by this name
        self.register_buffer("scales", scales)  # (N, K/32) fp16
        self.register_buffer("mins", mins)  # (N, K/32) fp16
        self.keep_dequantized = False
        """Save the dequantized W for the backward pass instead of dequantizing again. Only under
        activation checkpointing: there the forward's saved tensors are dropped and the layer's
        recomputation keeps W just until its backward (one decoder layer's weights at a time);
        without it every layer's float W would stay alive through the whole step."""
        self.skip_output_when: Callable[[], bool] | None = None
        """While this returns True, the forward pass returns zeros instead of x W^T (and still keeps what
        its backward needs): set by ``client/checkpointing.py`` on a layer whose output's value a
        checkpointed recomputation never reads."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        """Quantize an ``nn.Linear`` without bias (every linear layer of a llama block)."""
        if linear.bias is not None:
            raise ValueError("Int4Linear has no bias; the layer to quantize has one")
        return cls(*quantize4(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x W^T."""
        product = self.skip_output_when is None or not self.skip_output_when()
        return _Int4MatMul.apply(x, self.qweight, self.scales, self.mins, self.keep_dequantized, product)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the weight W (N, K), e.g. for tests and exports."""
        return dequantize4(self.qweight, self.scales, self.mins, dtype)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        """Describe the layer in ``print(model)``."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, block=32"


def register_with_peft(peft_config: Any) -> None:
    """Let peft put LoRA on :class:`Int4Linear` exactly as on ``nn.Linear`` (its ``lora.Linear`` layer)."""
    from peft.tuners.lora import Linear as LoraLinear

    peft_config._register_custom_module({Int4Linear: LoraLinear})


def is_int4_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a 4-bit base artifact (``server/quantize.py``)."""
    return (Path(folder) / QUANT_CONFIG).is_file()


def build_int4_model(folder: str | Path, dtype: torch.dtype) -> Any:
    """Build the causal LM of a 4-bit artifact: :class:`Int4Linear` blocks, the embedding dequantized to ``dtype``.

    The model is laid out on the meta device first, so no float copy of the linear weights is
    ever allocated.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    info = json.loads(read_bounded(folder / QUANT_CONFIG, MAX_QUANT_CONFIG_BYTES))
    if info.get("block_size") != BLOCK or info.get("bits") != 4:
        raise ValueError(f"{folder}: unsupported quantization {info.get('scheme')!r}")
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_file(folder / INT4_WEIGHTS)
    for module in info["int4_modules"]:
        parent, _, child = module.rpartition(".")
        q = tensors.pop(f"{module}.qweight")
        layer = Int4Linear(q, tensors.pop(f"{module}.scales"), tensors.pop(f"{module}.mins"))
        setattr(model.get_submodule(parent), child, layer)
    state = {}
    for key in list(tensors):
        if key.endswith(".qweight8"):
            stem = key[: -len(".qweight8")]
            state[f"{stem}.weight"] = dequantize8(tensors.pop(key), tensors.pop(f"{stem}.scales"), dtype)
    state.update({k: v.to(dtype) for k, v in tensors.items()})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{folder}: tensors the model does not have: {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, module in model.named_modules():  # non-persistent buffers (rotary inv_freq) are rebuilt
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=config))
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise ValueError(f"{folder}: no weights for {left[:3]}")
    return model.eval()
