"""The coordinator signs the ONNX export of its own base, and nothing else, as the edge devices' base release."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.onnx_release import publish_onnx_base
from shared.errors import ReleaseError
from shared.onnx_base import EXPORT_VERSION, is_onnx_base
from shared.release import make_release, read_release, verify_release, write_release
from shared.sign import TrustList

KEY = Ed25519PrivateKey.generate()
TRUST = TrustList.of(KEY.public_key())
DIGEST = "d" * 64


@pytest.fixture
def store(tmp_path):
    release, _ = make_release(
        {"model.int4.safetensors": b"codes", "quantization.json": b"{}"},
        kind="base", run_id="base", round=0, base_digest=DIGEST, method="int4", key=KEY,
    )  # fmt: skip
    write_release(release, tmp_path / "store" / "base")
    return tmp_path / "store"


def _export(folder, digest=DIGEST):
    folder.mkdir()
    info = {
        "base_digest": digest,
        "export_version": EXPORT_VERSION,
        "options": {"accuracy_level": 4, "output_bits": 8},
        "lora_layers": {"model.layers.0.attn.qkv_proj": {"in": 64, "modules": ["q"], "out": [64]}},
    }
    (folder / "export.json").write_text(json.dumps(info))
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "correction.safetensors", "base.onnx_adapter"):
        (folder / name).write_bytes(name.encode() * 3)
    return folder


def test_the_export_is_signed_as_a_base_release_every_file_covered(store, tmp_path):
    export = _export(tmp_path / "export")
    _, manifest = publish_onnx_base(export, store, KEY)
    release = read_release(store / "onnx")
    assert verify_release(release, TRUST, DIGEST) == manifest  # the adapters' base digest: they verify against it
    assert (manifest.kind, manifest.run_id) == ("base", "onnx") and is_onnx_base(release.files)
    assert manifest.sizes == {p.name: p.stat().st_size for p in export.iterdir()}
    again = publish_onnx_base(export, store, KEY)[1]
    assert again == manifest  # the same export again: no new release for devices to take


def test_an_export_of_another_base_is_not_published(store, tmp_path):
    with pytest.raises(ReleaseError, match="exported from base eeeeeeeeeeeeeeee…, the store publishes dddd"):
        publish_onnx_base(_export(tmp_path / "export", "e" * 64), store, KEY)
    assert not (store / "onnx").exists()


def test_an_incomplete_or_nested_export_is_not_published(store, tmp_path):
    export = _export(tmp_path / "export")
    (export / "base.onnx_adapter").unlink()
    with pytest.raises(ReleaseError, match="not a complete ONNX export"):
        publish_onnx_base(export, store, KEY)
    (export / "base.onnx_adapter").write_bytes(b"a")
    (export / "sub").mkdir()
    with pytest.raises(ReleaseError, match="sub: not a regular file"):
        publish_onnx_base(export, store, KEY)


def test_a_store_without_a_base_has_nothing_to_bind_the_export_to(tmp_path):
    with pytest.raises(ReleaseError, match="holds no 4-bit base release"):
        publish_onnx_base(_export(tmp_path / "export"), tmp_path / "empty", KEY)
