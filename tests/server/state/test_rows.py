import json
import math

from hypothesis import given
from hypothesis import strategies as st

from server.state.rows import config, plain
from server.state.values import finite, integer, node_id, text
from tests.server.state.records import ANY


def test_a_stored_config_reads_as_flat_finite_scalars():
    raw = json.dumps({"lr": 0.1, "name": "x", "on": True, "gone": None, "list": [1], "obj": {"a": 1}})
    assert config(raw) == {"lr": 0.1, "name": "x", "on": True, "gone": None}
    assert config('{"a": Infinity, "b": NaN, "c": 1}') == {"a": None, "b": None, "c": 1}
    for bad in ("not json", "[1, 2]", "1" * 5000, "[" * 100_000, "x" * (2 << 20), b"\xff", 7, None):
        assert config(bad) == {}
    assert config('{"n": ' + "9" * 30 + "}") == {}  # beyond 64 bits: dropped (its key only)


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
