import pytest
import torch

from server.validate import RejectedUpdateError, check_update

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
