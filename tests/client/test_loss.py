import pytest
import torch

import client.loss
from client.loss import output_nll


def _case(dtype, vocab=300, hidden=16, tokens=40):
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype).requires_grad_(False)  # frozen, as the tied embedding
    return head, torch.randn(tokens, hidden, dtype=dtype), torch.randint(0, vocab, (tokens,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_its_gradient_are_autograds(monkeypatch, dtype):
    monkeypatch.setattr(client.loss, "CHUNK", 7)  # 40 tokens: six chunks, the last one short
    head, hidden, targets = _case(dtype)
    ours_h, ref_h = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ours = output_nll(head, ours_h, targets)
    (ours / 3).backward()
    ref = torch.nn.functional.cross_entropy(head(ref_h).float(), targets, reduction="sum")
    (ref / 3).backward()
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(ref.item(), rel=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the 1/3 is applied before or after one rounding
    torch.testing.assert_close(ours_h.grad, ref_h.grad, rtol=tol, atol=tol)


def test_no_logits_are_kept_for_the_backward_pass():
    head, hidden, targets = _case(torch.float32)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output_nll(head, hidden.requires_grad_(), targets).backward()
    assert saved and all(300 not in shape for shape in saved), saved  # only (N, H): the gradient, made in forward


def test_a_trained_output_layer_takes_autograds_path_and_gets_its_gradient():
    head, hidden, targets = _case(torch.float32)
    head.weight.requires_grad_(True)
    output_nll(head, hidden, targets).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_evaluation_needs_no_gradient():
    head, hidden, targets = _case(torch.float32)
    with torch.inference_mode():
        nll = output_nll(head, hidden, targets)
    ref = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    assert nll.item() == pytest.approx(ref.item(), rel=1e-6)
