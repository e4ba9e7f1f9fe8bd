"""The 4-bit format: exact on Q4_1-style weights, the layout ONNX Runtime's MatMulNBits reads, and the frozen layer."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shared.adapter import adapter_state, attach_lora
from shared.config import LoraConfig
from shared.int4 import BLOCK, dequantize4, dequantize8, matmulnbits_zero_points, quantize4, quantize8
from shared.int4_layer import Int4Linear


def _q4_1_weights(n=48, k=96, seed=0):
    """Weights as GGUF Q4_1 stores them: per block of 32, fp16 scale d and min m, codes 0..15 with 0 and 15 used."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // BLOCK, BLOCK), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // BLOCK, 1, generator=g) * 0.05 + 0.001).half().float()
    m = (-torch.rand(n, k // BLOCK, 1, generator=g) * 0.4).half().float()
    return (d * q + m).reshape(n, k)


def test_quantizing_q4_1_weights_again_recovers_them_exactly():
    w = _q4_1_weights()
    assert torch.equal(dequantize4(*quantize4(w), torch.float32), w)


def test_any_weight_is_within_half_a_step():
    w = torch.randn(16, 64)
    packed, scales, mins = quantize4(w)
    err = (dequantize4(packed, scales, mins, torch.float32) - w).abs().reshape(16, 2, BLOCK)
    assert (err <= scales.float()[..., None] * 0.5 + 1e-3).all()
    assert packed.dtype == torch.uint8 and packed.shape == (16, 2, 16)


def test_8bit_embedding_blocks_recover_q8_0_weights_exactly():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (10, 2, BLOCK), generator=g)
    q[..., 0] = 127
    w = ((torch.rand(10, 2, 1, generator=g) * 0.01).half().float() * q).reshape(10, 64)
    assert torch.equal(dequantize8(*quantize8(w), torch.float32), w)


def test_onnx_runtime_matmulnbits_reads_the_same_codes():
    n, k, m = 48, 96, 5
    w = _q4_1_weights(n, k)
    packed, scales, mins = quantize4(w)
    inits = [
        numpy_helper.from_array(packed.numpy(), "B"),
        numpy_helper.from_array(scales.float().numpy(), "scales"),
        numpy_helper.from_array(matmulnbits_zero_points(scales, mins).numpy(), "zero_points"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales", "zero_points"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=32,
    )
    graph = helper.make_graph(
        [node],
        "int4",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(m, k)
    y = session.run(None, {"A": x.numpy()})[0]
    np.testing.assert_allclose(y, (x @ w.T).numpy(), rtol=1e-5, atol=1e-5)


def test_int4_linear_gradients_match_the_float_layer_and_the_base_stays_frozen():
    w = _q4_1_weights(32, 64)
    ref = torch.nn.Linear(64, 32, bias=False)
    ref.weight.data.copy_(w)
    layer = Int4Linear.from_linear(ref)
    x1 = torch.randn(3, 7, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    layer(x1).square().sum().backward()
    ref(x2).square().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert not [p for p in layer.parameters()]  # only 4-bit buffers: nothing to train, no float copy kept
    assert layer.qweight.dtype == torch.uint8


def test_lora_on_a_4bit_model_trains_and_has_the_float_models_adapter_keys(tiny_model_dir):
    from shared.model import load_model

    float_model = attach_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(rank=4), seed=0)
    base = load_model(str(tiny_model_dir), torch.float32)
    for module in list(base.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name.endswith("proj"):
                setattr(module, child_name, Int4Linear.from_linear(child))
    model = attach_lora(base, LoraConfig(rank=4), seed=0)
    assert adapter_state(model).keys() == adapter_state(float_model).keys()  # one adapter format for both bases
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("shape", [(4, 33), (4, 10)])
def test_widths_that_are_not_a_multiple_of_the_block_are_refused(shape):
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        quantize4(torch.zeros(shape))
