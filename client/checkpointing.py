"""Activation checkpointing of the decoder layers, recomputing only what the backward pass reads.

Under ``train.gradient-checkpointing = 1`` the forward pass keeps only each decoder layer's input,
and the backward pass of a layer recomputes its forward from there (Chen et al., 2016, arXiv
1604.06174). torch's reentrant ``checkpoint``: the first pass runs without autograd at all, which
left ~80 MiB less peak RSS than the non-reentrant one at seq 256 x batch 4 on SmolLM2 (same time).

A plain recomputation is a second forward pass. Three parts of it are not needed, and are skipped
here; the gradients are the same (tests/client/test_train.py):

- **dequantizing a third time**: the 4-bit layers keep the W they dequantized for the
  recomputation until its backward (one layer's weights at a time; ``Int4Linear.keep_dequantized``);
- **attention**: the first pass keeps each layer's attention output O and its log-sum-exp L
  (B x heads x T x (d + 1) values: 1.2 MB a layer in bf16 at SmolLM2's seq 256 x batch 4, ~36 MB
  for 30 layers); the recomputation hands O and L to torch's attention backward as if it had
  computed them (flash attention's backward needs Q, K, V, O and L; Dao et al., 2022, arXiv
  2205.14135), and recomputes only Q, K, V;
- **the MLP's down projection** (llama blocks): its output only feeds the layer's output
  ``h + down(silu(gate(x)) * up(x))``, whose value the backward pass never reads; backward needs W
  and the projection's input, which it has. The recomputation adds zeros instead of the product.

Measured on SmolLM2-135M (4-bit, bf16, seq 256 x batch 4, r = 8, AMD EPYC Zen 4): 3.81 -> 3.60 s a
step, 1.15x -> 1.09x the time of the default before issue 18, at 847 -> 911 MB peak RSS
(BENCHMARKS.md, "Training memory and time").
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch

from shared.adapter import causal_lm
from shared.int4_layer import Int4Linear

ATTENTION = "fleetlora_checkpointed"
"""Name of :func:`_attention` in transformers' attention registry."""
_PHASE: contextvars.ContextVar[str] = contextvars.ContextVar("fleetlora_checkpoint_phase", default="")
FIRST, RECOMPUTE = "first", "recompute"
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_DISCARDABLE = {"LlamaDecoderLayer": "mlp.down_proj"}
"""Per decoder layer class, the linear layer whose output only feeds the layer's output (read in
transformers' ``modeling_llama.py``: ``hidden_states = residual + self.mlp(...)``, nothing after)."""


def recomputing() -> bool:
    """Whether the caller runs inside a checkpointed layer's recomputation."""
    return _PHASE.get() == RECOMPUTE


def enable(model: Any) -> None:
    """Checkpoint every decoder layer of ``model`` (a peft model), its recomputation trimmed as above."""
    from transformers import AttentionInterface

    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.keep_dequantized = True
        attr = _DISCARDABLE.get(type(module).__name__)
        if attr is not None:
            linear = module.get_submodule(attr)
            base = getattr(linear, "base_layer", linear)  # peft's LoRA wrapper, or the layer itself
            if isinstance(base, Int4Linear):
                base.skip_output_when = recomputing
    config = causal_lm(model).config
    if config._attn_implementation == "sdpa":  # the kept output is what torch's sdpa would compute
        AttentionInterface.register(ATTENTION, _attention)
        config._attn_implementation = ATTENTION
    model.enable_input_require_grads()  # the reentrant variant differentiates through each layer's input
    lm = causal_lm(model)
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers' name since 5.2x (the old one warns)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and not isinstance(func, _Phased):
            module._gradient_checkpointing_func = _Phased(func)


def disable(model: Any) -> None:
    """Undo :func:`enable`: no checkpointing, no kept weights or attention outputs, the stock attention."""
    lm = causal_lm(model)
    getattr(lm, "activation_checkpointing_disable", lm.gradient_checkpointing_disable)()
    model.disable_input_require_grads()
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.keep_dequantized = False
            module.skip_output_when = None
        module.__dict__.pop("_fleetlora_kept", None)
    config = causal_lm(model).config
    if config._attn_implementation == ATTENTION:
        config._attn_implementation = "sdpa"


class _Phased:
    """transformers' checkpoint function, its layer run marked as the first pass or the recomputation.

    The reentrant ``checkpoint`` runs the layer once without autograd (the first pass) and again
    with it, inside the backward pass (the recomputation): grad mode tells them apart.
    """

    def __init__(self, checkpoint: Any) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        def phased(*a: Any, **k: Any) -> Any:
            token = _PHASE.set(RECOMPUTE if torch.is_grad_enabled() else FIRST)
            try:
                return function(*a, **k)
            finally:
                _PHASE.reset(token)

        return self.checkpoint(phased, *args, **kwargs)


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """Attention of a checkpointed layer: computed in the first pass, kept, reused by the recomputation.

    ``query`` (B, heads, T, d); ``key``, ``value`` (B, kv heads, T, d); the mask, if any, (B, 1, T, T).
    Anything else (no checkpointing phase, dropout, a cache, soft-capping) runs transformers' sdpa.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    phase = _PHASE.get()
    plain = dropout or key.shape[2] != query.shape[2] or any(kwargs.get(k) is not None for k in _UNSUPPORTED)
    if not phase or plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, heads, T, d)
    causal = attention_mask is None and getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:  # True = attend, as torch's sdpa converts it
        mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
    kept = module.__dict__.setdefault("_fleetlora_kept", [])
    if phase == FIRST or not kept:
        # O (B, heads, T, d) and its log-sum-exp L (B, heads, T)
        out, lse = _FLASH(query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)
        if phase == FIRST:
            kept.append((out, lse))
            return out.transpose(1, 2).contiguous(), None
    else:
        out, lse = kept.pop()
    out = _KeptAttention.apply(query, key, value, out, lse, causal, mask, scaling)
    return out.transpose(1, 2).contiguous(), None  # (B, T, heads, d)


_UNSUPPORTED = ("softcap", "sliding_window", "position_bias", "s_aux")


class _KeptAttention(torch.autograd.Function):
    """The attention output the first pass computed, with flash attention's backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                causal: bool, mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.mask, ctx.scale = causal, mask, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _FLASH_BACKWARD(grad.contiguous(), q, k, v, out, lse, 0.0, ctx.causal, attn_mask=ctx.mask,
                                     scale=ctx.scale)  # fmt: skip
        return dq, dk, dv, None, None, None, None, None
