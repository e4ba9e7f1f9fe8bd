"""Mixed LoRA ranks: a device's truncation and the coordinator's zero-padding (``shared/ranks.py``)."""

import pytest
import torch

from shared.ranks import pad, rank_of, rank_shapes, truncate

torch.manual_seed(0)
FULL = {"m.lora_A.weight": torch.randn(8, 12), "m.lora_B.weight": torch.randn(10, 8)}
SHAPES = {k: tuple(v.shape) for k, v in FULL.items()}


def test_a_device_keeps_the_first_components_and_the_coordinator_pads_the_rest_with_zeros():
    low = truncate(FULL, 2)
    assert rank_of({k: tuple(v.shape) for k, v in low.items()}) == 2
    assert torch.equal(low["m.lora_A.weight"], FULL["m.lora_A.weight"][:2])
    assert torch.equal(low["m.lora_B.weight"], FULL["m.lora_B.weight"][:, :2])
    padded = pad(low, SHAPES)
    assert torch.equal(padded["m.lora_A.weight"][:2], low["m.lora_A.weight"])
    assert not padded["m.lora_A.weight"][2:].any() and not padded["m.lora_B.weight"][:, 2:].any()


def test_a_padded_delta_changes_the_product_by_exactly_the_devices_own_change():
    """s (B + pad dB)(A + pad dA) = s B A + s [(B0 + dB)(A0 + dA) - B0 A0], B0 A0 the first r_i components."""
    a, b = FULL["m.lora_A.weight"], FULL["m.lora_B.weight"]
    d = {"m.lora_A.weight": torch.randn(3, 12) * 0.1, "m.lora_B.weight": torch.randn(10, 3) * 0.1}
    p = pad(d, SHAPES)
    implied = (b + p["m.lora_B.weight"]) @ (a + p["m.lora_A.weight"])
    a0, b0 = a[:3], b[:, :3]
    by_hand = b @ a + (b0 + d["m.lora_B.weight"]) @ (a0 + d["m.lora_A.weight"]) - b0 @ a0
    torch.testing.assert_close(implied, by_hand)


def test_shapes_at_a_rank_and_what_cannot_be_a_rank():
    assert rank_shapes(SHAPES, 3) == {"m.lora_A.weight": (3, 12), "m.lora_B.weight": (10, 3)}
    with pytest.raises(ValueError, match="2 ranks"):
        rank_of({"m.lora_A.weight": (8, 12), "m.lora_B.weight": (10, 4)})
    with pytest.raises(ValueError, match="matrices"):
        rank_of({"m.lora_A.weight": (8,)})
    for rank in (0, 9):
        with pytest.raises(ValueError, match=f"cannot keep {rank}"):
            truncate(FULL, rank)
    with pytest.raises(ValueError, match="does not fit"):
        pad({k: torch.zeros(10, 10) for k in FULL}, SHAPES)
