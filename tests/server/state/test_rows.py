import json
import math

from hypothesis import given
from hypothesis import strategies as st

from server.state.rows import (
    CLIPPING,
    MAX_NAME,
    config,
    finite,
    ident,
    integer,
    node_id,
    plain,
    round_privacy,
    run_privacy,
    text,
    within,
)
from tests.server.state.records import RUN_PRIVACY, privacy

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=50),
)


def test_numbers_that_are_not_finite_or_not_numbers_read_as_missing():
    assert [finite(v) for v in (1, 2.5, -0.0)] == [1.0, 2.5, -0.0]
    assert [finite(v) for v in (float("inf"), float("-inf"), float("nan"), "2.5", b"1", True, None, 10**400)] == [
        None
    ] * 8


def test_integers_are_bounded_and_whole():
    assert [integer(v) for v in (0, 500, 500.0, 2**63 - 1)] == [0, 500, 500, 2**63 - 1]
    assert [integer(v) for v in (-1, 2**63, 2.5, 1e30, float("inf"), "7", True)] == [None] * 7
    assert integer(2**31, 0, 2**31 - 1) is None


def test_node_ids_are_unsigned_64_bit_and_kept_as_text():
    assert [node_id(v) for v in (0, 2**64 - 1, "17", 5.0)] == ["0", str(2**64 - 1), "17", "5"]
    assert [node_id(v) for v in (-1, 2**64, "1e3", "", "٣", "9" * 21, b"5", None)] == [None] * 8


def test_text_is_cut_and_identifiers_refused_when_too_long():
    assert text("abc") == "abc" and text(b"abc") is None and text(3) is None
    cut = text("n" * 1000, MAX_NAME)
    assert len(cut) == MAX_NAME and cut.endswith("…")
    assert ident("run-1") == "run-1" and ident("") is None and ident("x" * 257) is None


def test_a_stored_config_reads_as_flat_finite_scalars():
    raw = json.dumps({"lr": 0.1, "name": "x", "on": True, "gone": None, "list": [1], "obj": {"a": 1}})
    assert config(raw) == {"lr": 0.1, "name": "x", "on": True, "gone": None}
    assert config('{"a": Infinity, "b": NaN, "c": 1}') == {"a": None, "b": None, "c": 1}
    for bad in ("not json", "[1, 2]", "1" * 5000, "[" * 100_000, "x" * (2 << 20), b"\xff", 7, None):
        assert config(bad) == {}
    assert config('{"n": ' + "9" * 30 + "}") == {}  # beyond 64 bits: dropped (its key only)


def test_a_range_is_closed_unless_its_low_end_is_open():
    assert [within(v, 0.0, 1.0) for v in (0, 0.5, 1.0)] == [0.0, 0.5, 1.0]
    assert [within(v, 0.0, 1.0) for v in (-1e-300, 1.0000001, float("nan"), "0.5", True)] == [None] * 5
    assert within(0.0, 0.0, open_low=True) is None and within(1e300, 0.0) == 1e300


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


def test_plain_turns_non_finite_floats_into_null():
    assert plain({"a": float("inf"), "b": [float("nan"), 1.5], 3: (1, "x")}) == {
        "a": None,
        "b": [None, 1.5],
        "3": [1, "x"],
    }
    assert json.loads(json.dumps(plain({"p": object()}), allow_nan=False))["p"].startswith("<object")


@given(ANY)
def test_the_parsers_never_raise_and_return_their_type(value):
    f = finite(value)
    assert f is None or (isinstance(f, float) and math.isfinite(f))
    i = integer(value)
    assert i is None or (type(i) is int and 0 <= i < 2**63)
    n = node_id(value)
    assert n is None or (n.isdigit() and int(n) < 2**64)
    assert text(value) is None or isinstance(text(value), str)
    json.dumps(plain(value), allow_nan=False)


@given(
    st.recursive(
        ANY.filter(lambda v: not isinstance(v, bytes)),
        lambda kids: st.dictionaries(st.text(max_size=5), kids) | st.lists(kids),
        max_leaves=20,
    )
)
def test_any_json_config_parses_to_json_safe_scalars(value):
    try:
        raw = json.dumps(value)
    except (ValueError, TypeError):
        return
    parsed = config(raw)
    assert all(v is None or isinstance(v, str | int | float | bool) for v in parsed.values())
    json.dumps(parsed, allow_nan=False)
