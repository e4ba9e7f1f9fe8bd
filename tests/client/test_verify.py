"""A device installs a release only after verification; a refused one leaves the active adapter as it was."""

import dataclasses

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.verify import install_release
from shared.adapter import ADAPTER_WEIGHTS, adapter_state, attach_lora
from shared.config import LoraConfig
from shared.errors import ReleaseError
from shared.model import load_model
from shared.release import make_release
from shared.replay import AcceptedReleases
from shared.sign import TrustList
from shared.tensors import save_tensors

BASE = "a" * 64
KEY = Ed25519PrivateKey.generate()
TRUST = TrustList.of(KEY.public_key())


@pytest.fixture
def device(tiny_model_dir, tmp_path):
    model = attach_lora(load_model(str(tiny_model_dir), torch.float32), LoraConfig(rank=4), seed=0)
    return model, AcceptedReleases(tmp_path / "accepted.json")


def _release(state, round=1, key=KEY, base=BASE, previous=""):
    files = {"adapter_config.json": b"{}", ADAPTER_WEIGHTS: save_tensors(state)}
    return make_release(
        files, kind="adapter", run_id="r", round=round, base_digest=base, method="fedavg", key=key, previous=previous
    )


def _shifted(model, by):
    return {k: v + by for k, v in adapter_state(model).items()}


def _refused_keeps_the_adapter(model, accepted, release, reason):
    before = adapter_state(model)
    with pytest.raises(ReleaseError, match=reason):
        install_release(model, release, TRUST, BASE, accepted)
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_good_release_is_loaded_and_bad_ones_leave_it_active(device):
    model, accepted = device
    good, m1 = _release(_shifted(model, 0.5))
    install_release(model, good, TRUST, BASE, accepted)
    loaded = adapter_state(model)
    next_state = {k: v + 0.25 for k, v in loaded.items()}

    blob = _release(next_state, round=2, previous=m1.digest())[0]
    corrupted = dataclasses.replace(blob, files={**blob.files, ADAPTER_WEIGHTS: blob.files[ADAPTER_WEIGHTS][:-7]})
    _refused_keeps_the_adapter(model, accepted, corrupted, "SHA-256")
    _refused_keeps_the_adapter(model, accepted, dataclasses.replace(blob, signature=bytes(64)), "signature")
    rogue = _release(next_state, round=2, key=Ed25519PrivateKey.generate(), previous=m1.digest())[0]
    _refused_keeps_the_adapter(model, accepted, rogue, "not in the trust list")
    other_base = _release(next_state, round=2, base="c" * 64, previous=m1.digest())[0]
    _refused_keeps_the_adapter(model, accepted, other_base, "for base model")
    replay = _release(_shifted(model, 9.0), round=1)[0]
    _refused_keeps_the_adapter(model, accepted, replay, "replay")
    wrong_shape = {k: torch.zeros(3, 3) for k in next_state}
    _refused_keeps_the_adapter(model, accepted, _release(wrong_shape, 2, previous=m1.digest())[0], "does not fit")
    assert all(torch.allclose(adapter_state(model)[k], loaded[k]) for k in loaded)

    install_release(model, blob, TRUST, BASE, accepted)  # the genuine round 2 still installs afterwards
    assert all(torch.allclose(adapter_state(model)[k], next_state[k], atol=1e-2) for k in next_state)


def test_a_release_the_device_cannot_record_is_not_used(device, tmp_path):
    model, _ = device
    (tmp_path / "full-disk").write_text("")  # the store's folder is a file: every write fails
    unwritable = AcceptedReleases(tmp_path / "full-disk" / "accepted.json")
    release, _ = _release(_shifted(model, 0.5))
    _refused_keeps_the_adapter(model, unwritable, release, "replay store .* cannot be written")


@pytest.mark.parametrize(
    ("value", "reason"),
    [(float("inf"), "non-finite values"), (float("nan"), "non-finite values"), (3e4, "holds 3e\\+04, beyond 1e\\+04")],
)
def test_a_release_with_non_finite_or_absurd_values_is_refused(device, value, reason):
    model, accepted = device
    good, m1 = _release(_shifted(model, 0.5))
    install_release(model, good, TRUST, BASE, accepted)
    poisoned = _shifted(model, 0.0)
    key = sorted(poisoned)[0]
    poisoned[key] = poisoned[key].clone()
    poisoned[key][0, 0] = value  # one entry is enough: it spreads through B·A into every logit
    release = _release(poisoned, round=2, previous=m1.digest())[0]
    _refused_keeps_the_adapter(model, accepted, release, reason)
    assert accepted.runs["adapter:r"]["round"] == 1  # and it is not recorded as accepted


def test_a_low_rank_device_loads_exactly_its_components_of_the_verified_release(tiny_model_dir, tmp_path):
    """Rank 2 of a rank-4 release: the first two components (rows of A, columns of B), only once verified."""
    run_cfg = LoraConfig(rank=4)
    full = attach_lora(load_model(str(tiny_model_dir), torch.float32), run_cfg, seed=0)
    release, first = _release(_shifted(full, 0.5))
    low = attach_lora(load_model(str(tiny_model_dir), torch.float32), run_cfg, seed=0, rank=2)
    assert low.peft_config["default"].r == 2 and low.peft_config["default"].lora_alpha == run_cfg.alpha / 2
    accepted = AcceptedReleases(tmp_path / "accepted.json")
    before = adapter_state(low)
    forged = dataclasses.replace(release, signature=bytes(64))
    with pytest.raises(ReleaseError, match="signature"):
        install_release(low, forged, TRUST, BASE, accepted, rank=2)
    assert all(torch.equal(before[k], v) for k, v in adapter_state(low).items())  # nothing loaded
    install_release(low, release, TRUST, BASE, accepted, rank=2)
    got, sent = adapter_state(low), _shifted(full, 0.5)
    assert set(got) == set(sent)
    for key, value in got.items():
        want = (sent[key][:2] if ".lora_A." in key else sent[key][:, :2]).half().float()  # releases are fp16
        assert value.shape == want.shape and torch.equal(value, want), key
    with pytest.raises(ReleaseError, match="lora-rank"):
        install_release(low, _release(sent, round=2, previous=first.digest())[0], TRUST, BASE, accepted, rank=5)
