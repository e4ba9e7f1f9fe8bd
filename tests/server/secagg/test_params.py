"""SecAgg+ parameters: values the protocol cannot honour are refused by name; the quantization cannot overflow."""

import pytest

from server.secagg.params import SecAggConfigError, SecAggParams, sensitivity


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"num_shares": 5, "threshold": 2}, "threshold"),  # not more than half: both secrets could be gathered
        ({"num_shares": 5, "threshold": 6}, "threshold"),  # more than the shares: never rebuilt
        ({"num_shares": 4, "threshold": 3}, "num-shares"),  # even: no symmetric ring
        ({"num_shares": 1, "threshold": 1}, "num-shares"),
        ({"num_shares": 257, "threshold": 129}, "num-shares"),  # each device would split its secrets 257 ways
        ({"modulus": 3 << 20}, "modulus"),
        ({"modulus": 1 << 33}, "modulus"),
        ({"max_devices": 1000, "levels": 1 << 23}, "levels"),  # 1000 * 2**23 >= 2**32: a sum could wrap
        ({"clip_range": 0.0}, "clip-range"),
        ({"clip_range": float("inf")}, "clip-range"),
        ({"timeout": 0.0}, "timeout"),
    ],
)
def test_values_the_protocol_cannot_honour_are_refused_by_name(fields, key):
    with pytest.raises(SecAggConfigError, match=f"aggregation.secure-{key} "):
        SecAggParams(**fields)


def test_default_levels_are_the_largest_that_max_devices_cannot_overflow():
    p = SecAggParams(max_devices=20)
    assert p.quant_levels == (2**32 - 1) // 20 and 20 * p.quant_levels < 2**32
    assert p.step == pytest.approx(2 * p.clip_range / p.quant_levels)


def test_a_round_needs_between_threshold_and_max_devices_devices():
    p = SecAggParams(num_shares=5, threshold=3, max_devices=10)
    assert p.for_round(4) == (4, 3) and p.for_round(10) == (5, 3)
    for n in (2, 11):
        with pytest.raises(SecAggConfigError, match="sampled devices"):
            p.for_round(n)


def test_sensitivity_grows_by_the_rounding_only():
    p = SecAggParams(clip_range=1.0, max_devices=1000)
    assert 1.0 < sensitivity(p, 2_440_000) < 1.001
