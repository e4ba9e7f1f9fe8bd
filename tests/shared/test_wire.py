import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from shared.wire import BLOCK, SCALE_SUFFIX, WireError, encoded_bytes, from_wire, pack, to_wire, unpack, wire_bytes

STATE = {"m.lora_A.weight": torch.randn(8, 100), "m.lora_B.weight": torch.randn(50, 8)}
SHAPES = {k: tuple(v.shape) for k, v in STATE.items()}


@pytest.mark.parametrize("encoding", ["fp16", "q8", "q4"])
def test_round_trip_error_is_bounded_by_half_a_step(encoding):
    back = unpack(pack(STATE, encoding), SHAPES, encoding)
    for key, x in STATE.items():
        assert back[key].shape == x.shape and back[key].dtype == torch.float32
        if encoding == "fp16":
            assert torch.allclose(back[key], x, rtol=1e-3, atol=1e-4)
            continue
        qmax = 127 if encoding == "q8" else 7
        blocks = torch.nn.functional.pad(x.flatten(), (0, -x.numel() % BLOCK)).reshape(-1, BLOCK)
        step = (blocks.abs().amax(1) / qmax)[:, None].expand_as(blocks).flatten()[: x.numel()].reshape(x.shape)
        assert ((back[key] - x).abs() <= step * 0.5 + step * 1e-3 + 1e-7).all()  # fp16 scale rounding


def test_q8_block_hand_computed():
    x = torch.zeros(BLOCK)
    x[0], x[1], x[2] = 1.27, -0.64, 0.004
    record = pack({"w": x}, "q8")
    scale = record["w" + SCALE_SUFFIX].numpy()
    codes = record["w"].numpy()
    assert scale.shape == (1,) and scale[0] == np.float16(0.01)
    assert codes.dtype == np.int8 and codes[0, :4].tolist() == [127, -64, 0, 0]  # -63.5 rounds to even


def test_q4_packs_two_codes_per_byte_and_unpacks_every_code():
    x = torch.tensor([float(c) for c in range(-7, 8)] + [0.0] * (BLOCK - 15))
    record = pack({"w": x}, "q4")
    assert record["w"].numpy().dtype == np.uint8 and record["w"].numpy().shape == (1, BLOCK // 2)
    assert torch.equal(unpack(record, {"w": (BLOCK,)}, "q4")["w"], x)


@pytest.mark.parametrize(("encoding", "ratio"), [("fp16", 1.0), ("q8", 0.516), ("q4", 0.266)])
def test_bytes_on_the_wire_match_the_declared_size(encoding, ratio):
    shapes = {"q.lora_A.weight": (8, 576), "q.lora_B.weight": (576, 8)}  # SmolLM2's q_proj
    record = pack({k: torch.randn(s) for k, s in shapes.items()}, encoding)
    n = sum(math.prod(s) for s in shapes.values())
    headers = 128 * len(record.keys())  # one .npy header per array
    assert 2 * n * ratio * 0.97 < wire_bytes(record) - headers < 2 * n * ratio * 1.03
    assert wire_bytes(record) <= encoded_bytes(shapes, encoding)  # the size limit an honest update meets


def _with(record, key, array):
    arrays = {k: record[k] for k in record.keys()}
    arrays[key] = Array(array)
    return ArrayRecord(arrays)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda r: _with(r, "m.lora_A.weight", r["m.lora_A.weight"].numpy().astype(np.float32)),
            r"float32.*expected int8",
        ),
        (
            lambda r: _with(r, "m.lora_A.weight", r["m.lora_A.weight"].numpy()[:5]),
            r"m\.lora_A\.weight arrived as int8 \(5, 64\)",
        ),
        (lambda r: _with(r, "m.lora_A.weight#scale", -r["m.lora_A.weight#scale"].numpy()), "negative or non-finite"),
        (lambda r: _with(r, "m.lora_A.weight#scale", np.full(13, np.inf, np.float16)), "negative or non-finite"),
        (lambda r: _with(r, "m.lora_A.weight", np.full((13, 64), -128, np.int8)), r"codes outside \[-127, 127\]"),
        (lambda r: ArrayRecord({k: r[k] for k in r.keys() if k != "m.lora_B.weight#scale"}), "missing"),
        (lambda r: _with(r, "extra", np.zeros(1, np.float16)), r"unexpected \['extra'\]"),
    ],
)
def test_a_malformed_q8_record_is_refused_with_what_differs(mutate, reason):
    with pytest.raises(WireError, match=reason):
        unpack(mutate(pack(STATE, "q8")), SHAPES, "q8")


def test_an_fp16_record_where_q8_is_expected_is_refused():
    with pytest.raises(WireError, match="missing"):
        unpack(pack(STATE, "fp16"), SHAPES, "q8")


def test_the_global_adapter_travels_as_fp16_only():
    assert torch.allclose(from_wire(to_wire(STATE))["m.lora_B.weight"], STATE["m.lora_B.weight"], atol=1e-2)
    with pytest.raises(WireError, match="int8, expected float16"):
        from_wire(pack(STATE, "q8"))
    with pytest.raises(WireError, match="unknown wire encoding 'q3'"):
        pack(STATE, "q3")


@pytest.mark.parametrize(("encoding", "rel"), [("q8", 0.01), ("q4", 0.03)])
@pytest.mark.parametrize("scale", [1e-3, 1e-4, 1e-5])
def test_small_deltas_keep_their_norm_through_the_quantized_encodings(encoding, scale, rel):
    # a clipped DP delta is this small: the fp16 scales are subnormal, and must still be honoured
    g = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(64, 256, generator=g) * scale}
    decoded = unpack(pack(delta, encoding), {"w": (64, 256)}, encoding)["w"]
    assert float(decoded.norm()) == pytest.approx(float(delta["w"].norm()), rel=rel)
    assert float((decoded - delta["w"]).norm()) < 0.2 * float(delta["w"].norm())
