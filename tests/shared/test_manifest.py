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


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_manifest_bytes_end_in_a_clean_rejection(data):
    with pytest.raises(ManifestError):
        parse(data)


def test_fuzz_structured_manifests_from_json_values():
    for obj in ([], "x", 1, None, {"kind": "adapter"}, {**GOOD, "round": True}):
        with pytest.raises(ManifestError):
            parse(json.dumps(obj).encode())
