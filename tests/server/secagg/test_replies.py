"""The coordinator's SecAgg+ trust boundary: each hostile reply refused by name, never half-parsed."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

from server.secagg.replies import (
    SecAggReplyError,
    parse_ciphertexts,
    parse_masked,
    parse_public_keys,
    parse_shares,
    parse_story_signature,
)
from shared.enrolment import Identity, enrol, prove_keys
from shared.secagg_stages import ENROLMENT, IDENTITY, KEYS_SIGNATURE, STORY_SIGNATURE
from tests.server.messages import message, through_flower

SHAPES = {"a": (2, 3)}
M = 1 << 32


def reply(records: dict):
    return through_flower(message(records))


def cfg(**values):
    return {RECORD_KEY_CONFIGS: ConfigRecord(values)}


def pk() -> bytes:
    return public_key_to_bytes(generate_key_pairs()[1])


def test_public_keys_parse_and_hostile_keys_are_refused():
    k1, k2 = pk(), pk()
    assert parse_public_keys(reply(cfg(pk1=k1, pk2=k2)), 7, "1") == ((k1, k2), None)
    for bad, reason in [(cfg(pk1=k1, pk2=k1), "identical"), (cfg(pk1=b"x" * 99, pk2=k2), "does not parse")]:
        with pytest.raises(SecAggReplyError, match=reason):
            parse_public_keys(reply(bad), 7, "1")
    with pytest.raises(SecAggReplyError, match="not 1 to 1024 bytes"):
        parse_public_keys(reply(cfg(pk1=b"x" * 5000, pk2=k2)), 7, "1")
    with pytest.raises(SecAggReplyError, match="keys are"):
        parse_public_keys(reply(cfg(pk1=k1, pk2=k2, extra=1)), 7, "1")


def test_an_enrolled_devices_proof_is_carried_whole_of_its_sizes_and_signed_for_its_node(tmp_path):
    k1, k2 = pk(), pk()
    identity = Ed25519PrivateKey.generate()
    public = identity.public_key().public_bytes_raw()
    signed = prove_keys(Identity(identity, public, enrol(Ed25519PrivateKey.generate(), public)), 1, "1", 7, k1, k2)
    proof = {IDENTITY: signed.identity, ENROLMENT: signed.enrolment, KEYS_SIGNATURE: signed.signature}
    assert parse_public_keys(reply(cfg(pk1=k1, pk2=k2, **proof)), 7, "1") == ((k1, k2), signed)  # run 1, node 7
    forged = prove_keys(Identity(identity, public, signed.enrolment[:32] + b"e" * 64), 1, "1", 7, k1, k2)
    with pytest.raises(SecAggReplyError, match="enrolment is not signed by the authority it names"):  # not counted
        parse_public_keys(reply(cfg(pk1=k1, pk2=k2, **{**proof, ENROLMENT: forged.enrolment})), 7, "1")
    for node, round_id in ((8, "1"), (7, "2")):  # a proof copied to another node, or kept from another round
        with pytest.raises(SecAggReplyError, match="did not sign these keys for this run, round and node"):
            parse_public_keys(reply(cfg(pk1=k1, pk2=k2, **proof)), node, round_id)
    for name, size in ((IDENTITY, 32), (ENROLMENT, 96), (KEYS_SIGNATURE, 64)):
        with pytest.raises(SecAggReplyError, match=f"'{name}' is not"):
            parse_public_keys(reply(cfg(pk1=k1, pk2=k2, **{**proof, name: b"x" * (size - 1)})), 7, "1")
        part = {k: v for k, v in proof.items() if k != name}  # a proof without one of its parts
        with pytest.raises(SecAggReplyError, match="keys are"):
            parse_public_keys(reply(cfg(pk1=k1, pk2=k2, **part)), 7, "1")


def test_ciphertexts_only_to_neighbours_once_each():
    good = cfg(**{Key.DESTINATION_LIST: [5, 6], Key.CIPHERTEXT_LIST: [b"a", b"b"]})
    assert parse_ciphertexts(reply(good), {5, 6}) == {5: b"a", 6: b"b"}
    bad = [
        ({Key.DESTINATION_LIST: [5, 9], Key.CIPHERTEXT_LIST: [b"a", b"b"]}, "not its neighbours"),
        ({Key.DESTINATION_LIST: [5, 5], Key.CIPHERTEXT_LIST: [b"a", b"b"]}, "unique"),
        ({Key.DESTINATION_LIST: [5], Key.CIPHERTEXT_LIST: [b"a" * 5000]}, "longer than"),
        ({Key.DESTINATION_LIST: [5, 6, 7], Key.CIPHERTEXT_LIST: [b"a"] * 3}, "at most 2"),
    ]
    for values, reason in bad:
        with pytest.raises(SecAggReplyError, match=reason):
            parse_ciphertexts(reply(cfg(**values)), {5, 6})


def masked(arr) -> dict:
    return {Key.MASKED_PARAMETERS: ArrayRecord({"a": Array(arr)}), "metrics": MetricRecord({"num-examples": 3})}


def test_a_masked_vector_parses_to_int64_and_the_train_records_pass_through():
    vector, rest = parse_masked(reply(masked(np.arange(6, dtype=np.uint32).reshape(2, 3))), SHAPES, M)
    assert vector["a"].dtype == np.int64 and vector["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert set(rest.keys()) == {"metrics"}


@pytest.mark.parametrize(
    ("arr", "modulus", "reason"),
    [
        (np.zeros((2, 3), dtype=np.float32), M, "expected uint32"),  # a plain delta instead of a masked one
        (np.zeros((3, 2), dtype=np.uint32), M, "expected uint32 \\(2, 3\\)"),
        (np.full((2, 3), 70_000, dtype=np.uint32), 1 << 16, "modulus"),
    ],
)
def test_hostile_masked_vectors_are_refused(arr, modulus, reason):
    with pytest.raises(SecAggReplyError, match=reason):
        parse_masked(reply(masked(arr)), SHAPES, modulus)


def test_a_masked_vector_with_other_records_or_tensors_is_refused():
    records = masked(np.zeros((2, 3), dtype=np.uint32))
    with pytest.raises(SecAggReplyError, match="unexpected records"):
        parse_masked(reply({**records, "arrays": ArrayRecord({"a": Array(np.zeros((2, 3)))})}), SHAPES, M)
    with pytest.raises(SecAggReplyError, match="unexpected"):
        parse_masked(reply(masked(np.zeros((2, 3), dtype=np.uint32))), {"b": (2, 3)}, M)


def test_shares_exactly_one_for_each_node_asked():
    share = b"\x01\x00\x00\x00" + b"s" * 16
    asked = {1: 1, 2: 1}  # owner -> the index its share for this device carries
    assert parse_shares(reply(cfg(**{Key.NODE_ID_LIST: [1, 2], Key.SHARE_LIST: [share, share]})), asked) == {
        1: share,
        2: share,
    }
    for nids, shares, reason in [([1, 3], [share, share], "expected one each"), ([1, 2], [share, b"xx"], "chunks")]:
        with pytest.raises(SecAggReplyError, match=reason):
            parse_shares(reply(cfg(**{Key.NODE_ID_LIST: nids, Key.SHARE_LIST: shares})), asked)
    with pytest.raises(SecAggReplyError, match="the share of device 2 carries index 1, not 3: not its own"):
        parse_shares(reply(cfg(**{Key.NODE_ID_LIST: [1, 2], Key.SHARE_LIST: [share, share]})), {1: 1, 2: 3})


def test_a_consistency_reply_is_the_devices_signature_over_its_list_or_nothing():
    key = Ed25519PrivateKey.generate()
    identity, story = key.public_key().public_bytes_raw(), b"the list it was sent"
    signature = key.sign(story)
    assert parse_story_signature(reply(cfg(**{STORY_SIGNATURE: signature})), identity, story) == signature
    assert parse_story_signature(reply(cfg(**{STORY_SIGNATURE: b""})), None, story) == b""  # no identity announced
    bad = [
        (cfg(**{STORY_SIGNATURE: bytes(64)}), identity, "did not sign the survivor list"),  # 64 zero bytes
        (cfg(**{STORY_SIGNATURE: key.sign(b"another list")}), identity, "did not sign the survivor list"),
        (cfg(**{STORY_SIGNATURE: signature[:63]}), identity, "did not sign the survivor list"),
        (cfg(**{STORY_SIGNATURE: "text"}), identity, "did not sign the survivor list"),
        (cfg(**{STORY_SIGNATURE: signature}), None, "announced no identity"),
        (cfg(other=b""), identity, "keys are"),
    ]
    for records, who, reason in bad:
        with pytest.raises(SecAggReplyError, match=reason):
            parse_story_signature(reply(records), who, story)
