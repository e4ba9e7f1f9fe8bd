import pytest
import torch

from server.validate import (
    RejectedUpdateError,
    check_aggregate,
    check_size,
    check_update,
    contribution_norms,
    norm_outliers,
)

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
    norms = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 15.1}  # the others of d: 1, 2, 3, median 2, bound 5 x 2 = 10
    assert list(norm_outliers(norms, 5.0)) == ["d"]
    assert "15.1 is more than 5x the median 2 of the others" in norm_outliers(norms, 5.0)["d"]
    assert norm_outliers({**norms, "d": 10.0}, 5.0) == {}  # at the bound: kept
    assert list(norm_outliers({**norms, "d": float("nan")}, 5.0)) == ["d"]


def test_with_two_updates_the_one_far_above_the_other_is_the_outlier():
    assert list(norm_outliers({"a": 1.0, "b": 1000.0}, 5.0)) == ["b"]
    assert norm_outliers({"a": 1.0, "b": 4.9}, 5.0) == {}
    assert norm_outliers({"a": 1.0}, 5.0) == {}  # one update: no rule (min-accepted decides)


def test_the_claimed_example_count_is_part_of_the_contribution():
    norms = {"a": 1.0, "b": 1.0, "c": 1.0}
    weights = {"a": 500.0, "b": 500.0, "c": 1e30}  # an ordinary delta with a huge claimed count
    contributions = contribution_norms(norms, weights)
    assert contributions == {"a": 1.0, "b": 1.0, "c": 2e27}
    assert list(norm_outliers(contributions, 5.0)) == ["c"]


def test_an_aggregate_that_is_not_finite_or_out_of_range_is_refused():
    check_aggregate({"x": torch.ones(2, 2)})
    with pytest.raises(RejectedUpdateError, match="x has non-finite"):
        check_aggregate({"x": torch.tensor([1.0, float("inf")])})
    with pytest.raises(RejectedUpdateError, match=r"reaches \|3e\+04\|, beyond the bound 10000"):
        check_aggregate({"x": torch.tensor([3e4])})


def test_size_limit():
    shapes = {"x.lora_A.weight": (2, 4)}
    check_size(16 + 128, shapes, "fp16")
    with pytest.raises(RejectedUpdateError, match=r"update is 1,000 bytes, more than the 208 of an fp16 delta"):
        check_size(1000, shapes, "fp16")
