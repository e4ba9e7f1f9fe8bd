"""The 4-bit base artifact: what the server builds, signs and serves once."""

import json

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.quantize import publish_base, quantize_model
from shared.int4_layer import Int4Linear
from shared.model import load_model, model_digest
from shared.release import read_release, verify_release
from shared.sign import TrustList


def test_the_artifact_loads_as_a_4bit_model_close_to_its_source(tiny_model_dir, tmp_path):
    info = quantize_model(tiny_model_dir, tmp_path / "int4", "s" * 64)
    assert info["block_size"] == 32 and info["source_digest"] == "s" * 64 and info["int4_modules"]
    model = load_model(str(tmp_path / "int4"), torch.float32)
    ref = load_model(str(tiny_model_dir), torch.float32)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == len(info["int4_modules"])
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
    # the tiny model's random fp32 weights are not on a 4-bit grid: close, not equal (SmolLM2's are; see the slow test)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_publish_signs_the_base_once_per_source(tiny_model_dir, tmp_path):
    key = Ed25519PrivateKey.generate()
    trust = TrustList.of(key.public_key())
    release, manifest = publish_base(tiny_model_dir, "s" * 64, tmp_path / "store", key)
    folder = tmp_path / "store" / "base"
    assert verify_release(read_release(folder), trust, manifest.base_digest) == manifest
    assert manifest.kind == "base" and "model.int4.safetensors" in manifest.files
    assert manifest.base_digest == model_digest(str(folder))  # adapters name the base the devices load
    again, _ = publish_base(tiny_model_dir, "s" * 64, tmp_path / "store", key)
    assert again.manifest_bytes == release.manifest_bytes  # reused, not re-quantized
    _, other = publish_base(tiny_model_dir, "t" * 64, tmp_path / "store", key)
    assert json.loads(read_release(folder).files["quantization.json"])["source_digest"] == "t" * 64
    assert other.digest() != manifest.digest()


def test_a_store_base_that_no_longer_reads_as_a_release_is_published_again(tiny_model_dir, tmp_path):
    key = Ed25519PrivateKey.generate()
    folder = tmp_path / "store" / "base"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text('{"format": 1}')  # signed by an older fleetlora: no sizes
    (folder / "manifest.sig").write_bytes(b"s" * 64)
    (folder / "stray.bin").write_bytes(b"x")
    _, manifest = publish_base(tiny_model_dir, "s" * 64, tmp_path / "store", key)  # raised ReleaseError
    assert verify_release(read_release(folder), TrustList.of(key.public_key()), manifest.base_digest) == manifest


@pytest.mark.parametrize("threads", [1, 2])
def test_a_lost_store_requantized_gives_the_same_base_digest_on_any_thread_count(tiny_model_dir, tmp_path, threads):
    # a coordinator that re-quantizes (a lost store, a second coordinator) must not orphan the devices' base
    key = Ed25519PrivateKey.generate()
    _, first = publish_base(tiny_model_dir, "s" * 64, tmp_path / "a", key)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, second = publish_base(tiny_model_dir, "s" * 64, tmp_path / "b", key)
    finally:
        torch.set_num_threads(before)
    assert second.base_digest == first.base_digest
    assert second.files == first.files  # every file, byte for byte (hash and size)


@pytest.mark.slow
def test_smollm2_4bit_artifact_reproduces_the_float_reference_exactly(real_model_dir, tmp_path):
    """SmolLM2 was published as Q4_1 (blocks of 32): our 4-bit codes are its codes, logits identical."""
    quantize_model(real_model_dir, tmp_path / "int4", "s" * 64)
    size = sum(p.stat().st_size for p in (tmp_path / "int4").iterdir())
    assert size < 101_000_000  # 100.2 MB with the 3.5 MB tokenizer; the fp32 source is 538 MB
    model = load_model(str(tmp_path / "int4"), torch.float32)
    ref = load_model(str(real_model_dir), torch.float32)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
