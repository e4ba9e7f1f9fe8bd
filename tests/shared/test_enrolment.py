"""Enrolment of SecAgg+ identities: what an authority signs, what a device loads, what a neighbour accepts."""

import base64

import pytest

from shared.cli import main
from shared.enrolment import KeysProof, check_keys, keys_message, load_identity, prove_keys
from shared.sign import SignatureError, TrustList, load_private_key

PK1, PK2 = b"pk1" * 40, b"pk2" * 40  # the SecAgg+ keys are opaque bytes here


@pytest.fixture
def device(tmp_path):
    """`fleetlora keys` as an authority and a device run them: an authority key, an identity, its enrolment."""
    for name in ("authority", "device", "stranger"):
        assert main(["keys", "generate", str(tmp_path / f"{name}.key")]) == 0
    out = tmp_path / "device.enrolment"
    assert main(["keys", "enrol", str(tmp_path / "device.key.pub"), "--authority", str(tmp_path / "authority.key"),
                 "--out", str(out)]) == 0  # fmt: skip
    return tmp_path


def test_a_device_loads_its_enrolment_and_a_neighbour_accepts_its_signed_keys(device):
    identity = load_identity(device / "device.key", device / "device.enrolment")
    proof = prove_keys(identity, 7, "round-3", 42, PK1, PK2)
    trust = TrustList.load(device / "authority.key.pub")
    check_keys(trust, proof, keys_message(7, "round-3", 42, PK1, PK2))  # no exception: accepted


@pytest.mark.parametrize(
    "run, round_id, node, keys",
    [(8, "round-3", 42, (PK1, PK2)), (7, "round-4", 42, (PK1, PK2)), (7, "round-3", 43, (PK1, PK2)),
     (7, "round-3", 42, (PK2, PK1)), (7, "round-3", 42, (b"x" * 120, PK2))],
)  # fmt: skip
def test_keys_signed_for_another_run_round_node_or_key_are_refused(device, run, round_id, node, keys):
    identity = load_identity(device / "device.key", device / "device.enrolment")
    proof = prove_keys(identity, 7, "round-3", 42, PK1, PK2)
    with pytest.raises(SignatureError, match="not the ones its identity signed"):
        check_keys(TrustList.load(device / "authority.key.pub"), proof, keys_message(run, round_id, node, *keys))


def test_an_authority_the_device_does_not_trust_or_revokes_is_refused_by_name(device):
    identity = load_identity(device / "device.key", device / "device.enrolment")
    proof = prove_keys(identity, 7, "r", 1, PK1, PK2)
    message = keys_message(7, "r", 1, PK1, PK2)
    with pytest.raises(SignatureError, match="not in the device's enrolment trust list"):
        check_keys(TrustList.load(device / "stranger.key.pub"), proof, message)
    authority = load_private_key(device / "authority.key").public_key()
    with pytest.raises(SignatureError, match="revokes"):
        check_keys(TrustList.of(authority, revoked=(authority,)), proof, message)


def test_an_identity_that_enrols_itself_or_a_forged_enrolment_is_refused(device):
    identity = load_identity(device / "device.key", device / "device.enrolment")
    stranger = load_private_key(device / "stranger.key")
    trust = TrustList.load(device / "authority.key.pub")
    message = keys_message(7, "r", 1, PK1, PK2)
    # the coordinator's own identity, its enrolment copied from an enrolled device: the authority signed another key
    own = stranger.public_key().public_bytes_raw()
    with pytest.raises(SignatureError, match="enrolment by authority .* does not hold"):
        check_keys(trust, KeysProof(own, identity.enrolment, stranger.sign(message)), message)
    with pytest.raises(SignatureError, match=r"a keys proof of \(32, 95, 64\) bytes"):
        check_keys(trust, KeysProof(identity.public, identity.enrolment[:-1], b"s" * 64), message)


def test_an_enrolment_file_of_another_key_or_not_an_enrolment_is_refused(device):
    with pytest.raises(SignatureError, match="enrols another identity"):
        load_identity(device / "stranger.key", device / "device.enrolment")
    words = (device / "device.enrolment").read_text().split()
    forged = bytearray(base64.b64decode(words[2]))
    forged[-1] ^= 1
    (device / "forged.enrolment").write_text(f"{words[0]} {words[1]} {base64.b64encode(bytes(forged)).decode()}\n")
    with pytest.raises(SignatureError, match="signature does not hold"):
        load_identity(device / "device.key", device / "forged.enrolment")
    (device / "junk.enrolment").write_text("ed25519 AAAA\n")
    with pytest.raises(SignatureError, match="not a 'fleetlora-enrolment-v1"):
        load_identity(device / "device.key", device / "junk.enrolment")
