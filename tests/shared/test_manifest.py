"""Manifest parsing: one canonical byte form per manifest, every file's size signed, anything else refused."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.manifest import MAX_FILE_BYTES, Manifest, ManifestError, canonical_json, parse

GOOD = {
    "format": 2,
    "kind": "adapter",
    "run_id": "run-1",
    "round": 3,
    "files": {"adapter_config.json": "a" * 64, "adapter_model.safetensors": "b" * 64},
    "sizes": {"adapter_config.json": 1206, "adapter_model.safetensors": 4884328},
    "base_digest": "c" * 64,
    "method": "fedavg",
    "created": "2026-11-24T05:00:00Z",
    "key_id": "0123456789abcdef",
    "previous": "d" * 64,
}


def _parse(**changes):
    return parse(canonical_json({**GOOD, **changes}))


def test_a_canonical_manifest_round_trips_with_its_sizes():
    manifest = _parse()
    assert manifest.sizes == GOOD["sizes"] and manifest.canonical() == canonical_json(GOOD)
    assert manifest.created_at().isoformat() == "2026-11-24T05:00:00+00:00"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"sizes": {"adapter_config.json": 1206}}, r"sizes must name exactly its files: missing \['adapter_model"),
        ({"sizes": {**GOOD["sizes"], "evil.py": 1}}, r"sizes must name exactly its files: .*unknown \['evil\.py'\]"),
        ({"sizes": {**GOOD["sizes"], "adapter_config.json": -1}}, "size of 'adapter_config.json' = -1 must be"),
        ({"sizes": {**GOOD["sizes"], "adapter_config.json": MAX_FILE_BYTES + 1}}, "must be an integer 0 to"),
        ({"sizes": {**GOOD["sizes"], "adapter_config.json": 1.5}}, "must be an integer"),
        ({"sizes": {**GOOD["sizes"], "adapter_config.json": True}}, "must be an integer"),
        (
            {"files": {n: "a" * 64 for n in "xyz"}, "sizes": {n: MAX_FILE_BYTES for n in "xyz"}},
            r"files total 6,442,450,944 bytes, more than 4,294,967,296",
        ),
        ({"created": "2026-13-45T05:00:00Z"}, "created"),
        ({"round": 10**12}, "round"),
    ],
)
def test_sizes_and_bounds_are_checked(changes, reason):
    with pytest.raises(ManifestError, match=reason):
        _parse(**changes)


def test_an_older_format_is_refused_by_name():
    old = {k: v for k, v in GOOD.items() if k != "sizes"} | {"format": 1}
    with pytest.raises(ManifestError, match="manifest format 1 is no longer accepted .*signs no file sizes"):
        parse(canonical_json(old))
    with pytest.raises(ManifestError, match="'format' = 3 must be 2"):
        _parse(format=3)


def test_a_manifest_is_built_only_from_valid_fields():
    with pytest.raises(ManifestError, match="sizes must name exactly its files"):
        Manifest(**{**GOOD, "sizes": {}})


def test_an_integer_of_4301_digits_is_a_manifest_error():
    with pytest.raises(ManifestError, match="not UTF-8 JSON: .*4300"):
        parse(canonical_json(GOOD).replace(b'"round":3', b'"round":' + b"9" * 4301))


@pytest.mark.parametrize("field", ["run_id", "method"])
def test_a_lone_surrogate_or_a_control_character_is_a_manifest_error(field):
    escaped = json.dumps({**GOOD, field: "run\ud800"}, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ManifestError, match=f"'{field}' .* printable characters"):
        parse(escaped)  # the JSON escape \ud800 decodes to a str that has no UTF-8 form
    with pytest.raises(ManifestError, match=f"'{field}' .* printable characters"):
        _parse(**{field: "run\nforged log line"})


def test_a_lone_surrogate_in_a_key_is_a_manifest_error():
    for obj in ({**GOOD, "\ud800": 1}, {**GOOD, "files": {"\ud800": "a" * 64}, "sizes": {"\ud800": 1}}):
        with pytest.raises(ManifestError):
            parse(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def _only_manifest_errors(data: bytes) -> None:
    """parse either returns the manifest those exact bytes spell or raises ManifestError; nothing else escapes."""
    try:
        manifest = parse(data)
    except ManifestError:
        return
    assert manifest.canonical() == data


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(data):
    _only_manifest_errors(data)


EDIT = st.tuples(st.integers(min_value=0), st.sampled_from("rid"), st.binary(min_size=1, max_size=8))


@settings(max_examples=2000, deadline=None)
@given(st.lists(EDIT, max_size=6))
def test_fuzz_mutated_valid_manifests(edits):
    data = bytearray(canonical_json(GOOD))
    for at, how, blob in edits:  # replace, insert or delete bytes at random places
        at %= len(data) + 1
        if how == "r":
            data[at : at + len(blob)] = blob
        elif how == "i":
            data[at:at] = blob
        else:
            del data[at : at + len(blob)]
    _only_manifest_errors(bytes(data))


ODD = st.sampled_from(["\ud800", "\udfff", "\x00", "\n", "\u202e"])  # lone surrogates, controls, bidi
TEXT = st.lists(st.characters() | ODD, max_size=30).map("".join)
LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**4000), max_value=10**4000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
)
JSON = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=30
)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(sorted(GOOD) + ["extra"]), st.one_of(TEXT, LEAF, JSON), st.booleans())
def test_fuzz_one_field_replaced_by_any_json_value(field, value, canonical):
    obj = {**GOOD, field: value}
    if canonical:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
    else:
        data = json.dumps(obj).encode()  # ASCII escapes: \ud800 reaches the parser as a lone surrogate
    _only_manifest_errors(data)


HUGE = st.one_of(
    st.integers(min_value=1, max_value=6000).map(lambda n: b"9" * n),  # past Python's 4300-digit limit
    st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"]" * n),  # nesting
    st.integers(min_value=1, max_value=5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from([b'"\\ud800"', b'"x\\udfffy"', b"1e999", b"-0", b"NaN", b"Infinity", b'"\\u0000"']),
    st.integers(min_value=1, max_value=70_000).map(lambda n: b'"' + b"a" * n + b'"'),  # past the size bound
)


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(sorted(GOOD)), HUGE)
def test_fuzz_nested_and_huge_values(field, token):
    data = canonical_json(GOOD)
    start = data.index(f'"{field}":'.encode()) + len(field) + 3
    end = start + len(canonical_json(GOOD[field]))
    _only_manifest_errors(data[:start] + token + data[end:])


def test_fuzz_structured_manifests_from_json_values():
    for obj in ([], "x", 1, None, {"kind": "adapter"}, {**GOOD, "round": True}):
        with pytest.raises(ManifestError):
            parse(json.dumps(obj).encode())
