import pytest
import torch

from server.validate import RejectedUpdateError, check_size, check_update, norm_outliers, update_norm

GLOBAL = {"x.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(4, 2)}


def test_a_well_formed_delta_passes():
    check_update({k: torch.randn_like(v) for k, v in GLOBAL.items()}, GLOBAL, weight=10)


@pytest.mark.parametrize(
    ("delta", "weight", "reason"),
    [
        ({"x.lora_A.weight": torch.zeros(2, 4)}, 10, r"missing \['x\.lora_B\.weight'\]"),
        ({**GLOBAL, "y.lora_A.weight": torch.zeros(1)}, 10, r"unexpected \['y\.lora_A\.weight'\]"),
        (
            {**GLOBAL, "x.lora_B.weight": torch.zeros(2, 4)},
            10,
            r"x\.lora_B\.weight has shape \(2, 4\), expected \(4, 2\)",
        ),
        ({**GLOBAL, "x.lora_A.weight": torch.full((2, 4), float("nan"))}, 10, r"x\.lora_A\.weight has non-finite"),
        ({**GLOBAL, "x.lora_A.weight": torch.full((2, 4), float("inf"))}, 10, r"non-finite"),
        (GLOBAL, 0, r"num-examples = 0, expected > 0"),
    ],
)
def test_each_bad_update_is_rejected_with_its_reason(delta, weight, reason):
    with pytest.raises(RejectedUpdateError, match=reason):
        check_update(delta, GLOBAL, weight)


def test_norm_outliers_hand_computed():
    norms = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 15.1}  # median 2.5, bound 5 x 2.5 = 12.5
    assert list(norm_outliers(norms, 5.0)) == ["d"]
    assert "15.1 is more than 5x the round's median 2.5" in norm_outliers(norms, 5.0)["d"]
    assert norm_outliers({**norms, "d": 12.5}, 5.0) == {}  # at the bound: kept


def test_norm_rule_needs_three_updates():
    assert norm_outliers({"a": 1.0, "b": 1000.0}, 5.0) == {}


def test_update_norm_spans_all_tensors():
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)


def test_size_limit():
    shapes = {"x.lora_A.weight": (2, 4)}
    check_size(16 + 128, shapes, "fp16")
    with pytest.raises(RejectedUpdateError, match=r"update is 1,000 bytes, more than the 208 of an fp16 delta"):
        check_size(1000, shapes, "fp16")
