"""The output layer and cross-entropy of the response tokens, in chunks, its gradient taken on the way.

    loss = sum_i [ logsumexp(z_i) - z_i[t_i] ],     z_i = float(W h_i)   (W: the tied, frozen embedding)
    dloss/dh_i = W^T (softmax(z_i) - onehot(t_i))

With a 49k vocabulary, autograd keeps the (N, V) logits of a step's N response tokens several
times over (the output layer's result, its fp32 copy, the softmax saved by the cross-entropy, and
their gradients in the backward pass): ~0.3 GB at 400 tokens, the largest single peak of a step.
Here the logits of ``CHUNK`` tokens at a time are made, turned into their loss *and* into the
gradient with respect to the hidden states (an (N, H) tensor, 85x smaller than the logits), and
freed; the backward pass only scales that gradient. No logit is computed twice (the fused
linear cross-entropy of Liger-Kernel, Hsu et al., 2024, arXiv 2410.10989, which exists for GPUs
only). Same arithmetic as ``cross_entropy(lm_head(h).float(), t, reduction="sum")``: the output
layer in the hidden states' dtype, softmax in fp32, the logits' gradient cast back to the
hidden states' dtype before it meets W, as autograd does.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 32
"""Response tokens per chunk: (32, 49152) fp32 logits are 6 MB. Measured at seq 256 x batch 4 with
checkpointing: peak RSS 1,002 MiB at 128 and 915 MiB at 32, same time per step (glibc keeps
the larger chunks' pages)."""


def output_nll(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the summed cross-entropy of ``lm_head(hidden).float()`` against ``targets`` (N,), in chunks.

    The chunked path needs a frozen, bias-free linear output layer (the tied embedding of every
    model we train); anything else (e.g. a trained ``lm_head``) takes autograd's plain path.
    """
    weight = getattr(lm_head, "weight", None)
    plain = type(lm_head) is not torch.nn.Linear or lm_head.bias is not None or weight is None or weight.requires_grad
    if plain:
        return torch.nn.functional.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")
    return _ChunkedNLL.apply(hidden, weight, targets)


class _ChunkedNLL(torch.autograd.Function):
    """Forward: the summed loss, and dloss/dhidden kept for the backward pass; no gradient for W."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None  # (N, H)
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], CHUNK):
            h, t = hidden[start : start + CHUNK], targets[start : start + CHUNK]
            logits = torch.nn.functional.linear(h, weight).float()  # (C, V)
            lse = torch.logsumexp(logits, dim=1)  # (C,)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (C, V)
                probs[torch.arange(len(t)), t] -= 1.0
                grad[start : start + CHUNK] = probs.to(hidden.dtype) @ weight  # (C, H)
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> Any:
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None
