"""Signed releases: every tampered region and every policy violation is refused with its own reason."""

import dataclasses
import json

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ReleaseError
from shared.manifest import Manifest
from shared.release import make_release, read_release, verify_release, write_release
from shared.sign import TrustList, key_id
from shared.tensors import load_tensors, save_tensors

BASE = "b" * 64
KEY = Ed25519PrivateKey.generate()
STATE = {"m.lora_A.weight": torch.randn(4, 8), "m.lora_B.weight": torch.randn(8, 4)}
FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": save_tensors(STATE)}


def _trust(*keys, revoked=()):
    return TrustList.of(*(k.public_key() for k in keys), revoked=tuple(k.public_key() for k in revoked))


def _release(round=1, key=KEY, base=BASE, previous="", files=FILES, run_id="run-1"):
    return make_release(
        files, kind="adapter", run_id=run_id, round=round, base_digest=base, method="fedavg", key=key, previous=previous
    )


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_a_good_release_verifies_and_round_trips_through_a_folder(tmp_path):
    release, manifest = _release()
    back = read_release(write_release(release, tmp_path / "round-1"))
    got = verify_release(back, _trust(KEY), BASE)
    assert got == manifest and got.key_id == key_id(KEY.public_key())
    tensors = load_tensors(back.files["adapter_model.safetensors"])
    assert torch.allclose(tensors["m.lora_B.weight"], STATE["m.lora_B.weight"], atol=1e-2)


def _with_file(release, name, data):
    return dataclasses.replace(release, files={**release.files, name: data})


REJECTIONS = {
    "safetensors header": (
        lambda r: _with_file(r, "adapter_model.safetensors", _flip(r.files["adapter_model.safetensors"], 12)),
        r"adapter_model\.safetensors: SHA-256 .* does not match",
    ),
    "tensor bytes": (
        lambda r: _with_file(r, "adapter_model.safetensors", _flip(r.files["adapter_model.safetensors"], -3)),
        r"adapter_model\.safetensors: SHA-256",
    ),
    "truncated file": (
        lambda r: _with_file(r, "adapter_model.safetensors", r.files["adapter_model.safetensors"][:-100]),
        r"adapter_model\.safetensors: SHA-256",
    ),
    "manifest of format 1": (
        lambda r: dataclasses.replace(r, manifest_bytes=r.manifest_bytes.replace(b'"format":2', b'"format":1')),
        "manifest format 1 is no longer accepted",
    ),
    "config file": (lambda r: _with_file(r, "adapter_config.json", b'{"r": 8}'), r"adapter_config\.json: SHA-256"),
    "missing file": (
        lambda r: dataclasses.replace(r, files={"adapter_config.json": r.files["adapter_config.json"]}),
        r"missing \['adapter_model\.safetensors'\]",
    ),
    "extra file": (lambda r: _with_file(r, "evil.py", b"import os"), r"unexpected \['evil\.py'\]"),
    "signature bit": (lambda r: dataclasses.replace(r, signature=_flip(r.signature, 5)), "signature does not match"),
    "signature length": (lambda r: dataclasses.replace(r, signature=r.signature[:63]), "signature is 63 bytes"),
    "manifest whitespace": (
        lambda r: dataclasses.replace(r, manifest_bytes=r.manifest_bytes.replace(b",", b", ", 1)),
        "not in canonical form",
    ),
    "manifest garbage": (lambda r: dataclasses.replace(r, manifest_bytes=b"\xff\xfe"), "not UTF-8 JSON"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_tampered_region_is_rejected_with_its_reason(case):
    mutate, reason = REJECTIONS[case]
    release, _ = _release()
    with pytest.raises(ReleaseError, match=reason):
        verify_release(mutate(release), _trust(KEY), BASE)


FIELD_CHANGES = {
    "kind": "base",
    "run_id": "run-2",
    "round": 7,
    "files": {"adapter_model.safetensors": "0" * 64},
    "sizes": {"adapter_config.json": 9, "adapter_model.safetensors": 1},
    "base_digest": "c" * 64,
    "method": "ties",
    "created": "2030-01-01T00:00:00Z",
    "key_id": "0123456789abcdef",
    "previous": "d" * 64,
}


@pytest.mark.parametrize("field", sorted(FIELD_CHANGES))
def test_each_manifest_field_is_bound_by_the_signature(field):
    release, manifest = _release()
    forged = json.loads(release.manifest_bytes)
    forged[field] = FIELD_CHANGES[field]
    if field == "files":
        forged["sizes"] = {"adapter_model.safetensors": 1}
    forged_bytes = Manifest(**forged).canonical()
    reason = "not in the trust list" if field == "key_id" else "signature does not match"
    with pytest.raises(ReleaseError, match=reason):
        verify_release(dataclasses.replace(release, manifest_bytes=forged_bytes), _trust(KEY), BASE)


def test_untrusted_and_revoked_keys_are_refused_and_rotation_works():
    other = Ed25519PrivateKey.generate()
    release, _ = _release(key=other)
    with pytest.raises(ReleaseError, match="not in the trust list"):
        verify_release(release, _trust(KEY), BASE)
    assert verify_release(release, _trust(KEY, other), BASE).key_id == key_id(other.public_key())  # rotation
    with pytest.raises(ReleaseError, match="revokes"):
        verify_release(release, _trust(KEY, other, revoked=[other]), BASE)


def test_a_release_for_another_base_is_refused():
    release, _ = _release(base="c" * 64)
    with pytest.raises(ReleaseError, match="release is for base model cccccccccccccccc…, this device has bbbb"):
        verify_release(release, _trust(KEY), BASE)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255), st.booleans())
def test_fuzz_any_corrupted_release_is_rejected_never_loaded(pos, value, in_manifest):
    release, _ = _release()
    target = release.manifest_bytes if in_manifest else release.files["adapter_model.safetensors"]
    pos %= len(target)
    if target[pos] == value:
        return
    corrupted = target[:pos] + bytes([value]) + target[pos + 1 :]
    changed = (
        dataclasses.replace(release, manifest_bytes=corrupted)
        if in_manifest
        else _with_file(release, "adapter_model.safetensors", corrupted)
    )
    with pytest.raises(ReleaseError):
        verify_release(changed, _trust(KEY), BASE)


def test_a_file_whose_length_differs_from_its_signed_size_is_refused():
    release, manifest = _release()
    lying = dataclasses.replace(manifest, sizes={**manifest.sizes, "adapter_config.json": 1000})  # signed, but wrong
    forged = dataclasses.replace(release, manifest_bytes=lying.canonical(), signature=KEY.sign(lying.canonical()))
    with pytest.raises(ReleaseError, match=r"adapter_config\.json: 8 bytes, the manifest signs 1,000"):
        verify_release(forged, _trust(KEY), BASE)
