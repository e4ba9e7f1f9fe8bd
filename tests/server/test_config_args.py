"""``server/config_args.py``: what we format for ``--run-config`` / ``--node-config`` is what Flower parses back."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config_args import config_arg, parse_overrides
from shared.config import FleetConfig, _flat_fields
from shared.config_checks import ConfigError

KEY = st.sampled_from(sorted(_flat_fields(FleetConfig)))  # our run config's keys
# any text but surrogates; one with a double quote (a signature record is JSON) has no single quote, no control char
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
LITERAL = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="'"), max_size=40)
VALUE = st.one_of(
    st.booleans(),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT.filter(lambda t: '"' not in t),
    LITERAL.map(lambda t: f'{{"k": "{t}"}}'),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEY, VALUE, max_size=6))
def test_every_value_we_format_is_the_value_flower_parses_back(values):
    parsed = parse_config_args([config_arg(values)]) if values else {}
    assert parsed.keys() == values.keys()
    for key, value in values.items():
        got = parsed[key]
        assert got == value and type(got) is type(value), (key, value, got)


def test_a_value_with_both_quote_kinds_is_refused_not_mangled():
    for bad in ("""it's "quoted" """, '{"a": "line\nbreak"}', '"\x7f"'):
        with pytest.raises(ValueError, match="both quote kinds or a control character"):
            config_arg({"a": bad})
    for other, why in ((None, "not NoneType"), ([1, 2], "not list"), (2**63, "64 bits")):
        with pytest.raises(ValueError, match=why):
            config_arg({"a": other})


def test_our_own_run_config_pairs_take_toml_scalars_or_bare_words():
    assert parse_overrides(["train.steps=5", "aggregation.method=ties", 'run-name="a b"', "x=1e-3"]) == {
        "train.steps": 5,
        "aggregation.method": "ties",
        "run-name": "a b",
        "x": 1e-3,
    }
    assert parse_overrides(["a=1979-05-27", "b=[1, 2]"]) == {"a": "1979-05-27", "b": "[1, 2]"}  # not a date, a list
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_overrides(["train.steps"])
