import json
import math

from hypothesis import given
from hypothesis import strategies as st

from server.state.facts import CLIPPING, round_privacy, round_secure, run_privacy
from tests.server.state.records import ANY, RUN_PRIVACY, SECURE, privacy


def test_privacy_facts_are_kept_within_their_bounds():
    assert round_privacy(privacy(3)) == privacy(3)  # what the coordinator records reads back as it was
    assert run_privacy(RUN_PRIVACY) == RUN_PRIVACY
    hostile = {
        "epsilon": -1.0,  # ε is never negative
        "delta": 1.0,  # δ = 1 promises nothing
        "noise_multiplier": float("inf"),
        "clip_norm": 0.0,  # C = 0 would clip every update to nothing
        "clipped_fraction": 1.01,
        "sampling_rate": 0.0,
        "expected_clients": 0.0,
        "clipping": "Server",
    }
    assert round_privacy(hostile) == dict.fromkeys(hostile)
    assert round_privacy({}) == dict.fromkeys(privacy(0))  # a key missing: None, never a KeyError
    hostile_run = {"delta": 0.0, "max_epsilon": -2.0, "clip_norm": -1.0, "clipping": ["server"], "population": 2**31}
    assert run_privacy(hostile_run) == dict.fromkeys(RUN_PRIVACY)
    assert run_privacy({"max_epsilon": 0.0, "population": 0})["max_epsilon"] == 0.0  # 0: no limit, a real value


@given(st.dictionaries(st.sampled_from(sorted(privacy(0))), ANY))
def test_any_privacy_record_parses_to_bounded_values(values):
    parsed = round_privacy(values)
    assert parsed["epsilon"] is None or 0.0 <= parsed["epsilon"] < math.inf
    assert parsed["delta"] is None or 0.0 < parsed["delta"] < 1.0
    for key in ("clipped_fraction", "sampling_rate"):
        assert parsed[key] is None or 0.0 <= parsed[key] <= 1.0
    for key in ("clip_norm", "expected_clients", "sampling_rate"):
        assert parsed[key] is None or parsed[key] > 0.0
    assert parsed["clipping"] is None or parsed["clipping"] in CLIPPING
    json.dumps(parsed, allow_nan=False)


def test_secure_aggregation_facts_are_kept_within_their_bounds():
    assert round_secure(SECURE) == SECURE  # what the coordinator records reads back as it was
    hostile = {"survivors": -1, "recovered": 2.5, "dropped": "1", "shares": 0, "threshold": True, "clip_range": 0.0}
    assert round_secure(hostile) == dict.fromkeys(SECURE)
    assert round_secure({}) == dict.fromkeys(SECURE)  # a key missing: None, never a KeyError


@given(st.dictionaries(st.sampled_from(sorted(SECURE)), ANY))
def test_any_secure_record_parses_to_bounded_values(values):
    parsed = round_secure(values)
    for key in ("survivors", "recovered", "dropped", "shares", "threshold"):
        assert parsed[key] is None or (type(parsed[key]) is int and 0 <= parsed[key] < 2**31)
    assert parsed["clip_range"] is None or 0.0 < parsed["clip_range"] < math.inf
    json.dumps(parsed, allow_nan=False)
