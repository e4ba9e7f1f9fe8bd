"""SecAgg+ against a coordinator that substitutes keys: enrolled devices share only with keys an identity signed.

Real protocol (our coordinator stages, our client mod, Flower's InMemoryGrid and encoding), real Ed25519
identities and enrolments written by ``fleetlora keys``' functions. The hostile coordinator is a mod in
front of device 0's ``secagg_mod`` that rewrites the share-keys message it forwards, as a coordinator can.
"""

import contextlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    public_key_to_bytes,
)

from server.secagg.protocol import SecAggAbortedError, run_secagg
from shared.enrolment import enrol, load_identity, prove_keys, write_enrolment
from shared.secagg_stages import CONSISTENCY, IDENTITY, PROOF_KEYS, STORY_SIGNATURE
from shared.sign import generate_key, public_line
from tests.server.secagg.fleet import Fleet
from tests.server.secagg.test_protocol import PARAMS, SHAPES, assert_within_quantization, deltas, plain_sum


def enrolled(folder: Path, n: int, authority: str = "authority") -> list[dict[str, str]]:
    """``n`` devices' node configs: an identity each, enrolled by ``authority``, which each of them trusts."""
    key = generate_key(folder / f"{authority}.key")
    trust = folder / f"{authority}.trust"
    trust.write_text(public_line(key.public_key()) + "\n")
    configs = []
    for i in range(n):
        identity = generate_key(folder / f"{authority}-device-{i}.key")
        raw = identity.public_key().public_bytes_raw()
        write_enrolment(folder / f"{authority}-device-{i}.enrolment", raw, enrol(key, raw))
        configs.append({
            "secagg-identity-key": str(folder / f"{authority}-device-{i}.key"),
            "secagg-enrolment": str(folder / f"{authority}-device-{i}.enrolment"),
            "secagg-enrolment-trust": str(trust),
        })  # fmt: skip
    return configs


class Substitute:
    """A hostile coordinator: device 0 is sent keys of the coordinator's own as every neighbour's."""

    def __init__(self) -> None:
        self.pairs: dict[str, tuple] = {}  # neighbour -> (sk1, pk1, sk2, pk2) the coordinator made
        self.victim: tuple[bytes, bytes] | None = None
        self.ciphertexts: list[bytes] = []

    def __call__(self, msg, context, call_next):
        config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is None or config[Key.STAGE] != Stage.SHARE_KEYS:
            return call_next(msg, context)
        own = str(msg.metadata.dst_node_id)
        self.victim = (config[own][0], config[own][1])
        for name in [k for k in config if k not in (own, Key.STAGE)]:
            sk1, pk1 = generate_key_pairs()
            sk2, pk2 = generate_key_pairs()
            self.pairs[name] = (sk1, sk2)
            keys = list(config[name])
            keys[0], keys[1] = public_key_to_bytes(pk1), public_key_to_bytes(pk2)
            config[name] = keys  # the neighbour's enrolment and signature stay: they are all it can forward
        reply = call_next(msg, context)
        if not reply.has_error():
            self.ciphertexts = list(reply.content[RECORD_KEY_CONFIGS][Key.CIPHERTEXT_LIST])
        return reply

    def victims_secrets(self) -> tuple[bytes, bytes] | None:
        """Decrypt what device 0 encrypted for the substituted keys; rebuild its mask seed and pairwise-mask key."""
        assert self.victim is not None
        seed_shares, key_shares = [], []
        for text in self.ciphertexts:
            for _, sk2 in self.pairs.values():
                try:
                    plain = decrypt(generate_shared_key(sk2, bytes_to_public_key(self.victim[1])), text)
                except Exception:  # noqa: BLE001 (not encrypted for this pair)
                    continue
                _, _, seed_share, key_share = share_keys_plaintext_separate(plain)
                seed_shares.append(seed_share)
                key_shares.append(key_share)
        if len(key_shares) < PARAMS.threshold:
            return None
        return combine_shares(seed_shares), combine_shares(key_shares)


def test_an_enrolled_fleet_sums_every_device_and_each_setup_reply_carried_a_signed_proof(tmp_path):
    ds = deltas(5, seed=20)
    with Fleet(ds, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert result.survivors == tuple(sorted(fleet.nodes)) and result.rejected == {}
    assert_within_quantization(result.total, plain_sum(ds), 5)
    configs = [m.content.config_records.get(RECORD_KEY_CONFIGS, {}) for _, m in fleet.received]
    setups = [c for c in configs if Key.PUBLIC_KEY_1 in c]
    assert len(setups) == 5 and all(len(c[IDENTITY]) == 32 for c in setups)


def test_without_enrolment_a_coordinator_substituting_keys_rebuilds_a_devices_private_key():
    """The threat, as the README states it: SecAgg+ alone trusts the coordinator to forward keys as sent."""
    attack = Substitute()
    with Fleet(deltas(5, seed=21), mods={0: [attack]}) as fleet:
        run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    secrets = attack.victims_secrets()
    assert secrets is not None and attack.victim is not None
    seed, key = secrets  # everything that hides device 0's masked vector: its own mask and its pairwise ones
    assert len(seed) == 32 and public_key_to_bytes(bytes_to_private_key(key).public_key()) == attack.victim[0]


def test_enrolled_devices_encrypt_nothing_for_substituted_keys_and_the_round_sums_the_others(tmp_path):
    attack = Substitute()
    ds = deltas(5, seed=22)
    with Fleet(ds, mods={0: [attack]}, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert attack.ciphertexts == [] and attack.victims_secrets() is None
    victim = fleet.nodes[0]
    assert set(result.rejected) == {victim} and "fewer than the threshold - 1" in result.rejected[victim]
    assert "0 neighbours whose keys an enrolled identity signed" in result.rejected[victim]
    assert ": the public keys are not the ones" in result.rejected[victim]  # (the rejection is cut to a bound)
    assert_within_quantization(result.total, plain_sum(ds[1:]), 4)


def test_a_device_another_authority_enrolled_gets_no_shares_and_only_it_leaves(tmp_path):
    configs = enrolled(tmp_path, 5)
    configs[3] = {
        **enrolled(tmp_path, 1, "stranger")[0],
        "secagg-enrolment-trust": configs[0]["secagg-enrolment-trust"],
    }
    ds = deltas(5, seed=23)
    with Fleet(ds, node_configs=dict(enumerate(configs))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    stranger = fleet.nodes[3]
    assert stranger not in result.survivors and set(result.survivors) == set(fleet.nodes) - {stranger}
    assert_within_quantization(result.total, plain_sum([d for i, d in enumerate(ds) if i != 3]), 4)


def test_a_device_that_takes_only_enrolled_neighbours_but_has_no_identity_says_so(tmp_path):
    configs = enrolled(tmp_path, 5)
    configs[1] = {"secagg-enrolment-trust": configs[1]["secagg-enrolment-trust"]}
    with Fleet(deltas(5, seed=24), node_configs=dict(enumerate(configs))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert "are set together" in result.rejected[fleet.nodes[1]]
    assert len(result.survivors) == 4


@pytest.mark.parametrize("missing", ["secagg-identity-key", "secagg-enrolment", "secagg-enrolment-trust"])
def test_an_identity_without_its_enrolment_key_or_trust_list_is_a_config_error(tmp_path, missing):
    """A device that signed its survivor list without checking its neighbours' could be made to open one (review)."""
    from client.device import DeviceConfigError, secagg_enrolment

    config = {k: v for k, v in enrolled(tmp_path, 1)[0].items() if k != missing}
    with pytest.raises(DeviceConfigError, match="are set together"):
        secagg_enrolment(config)


def test_two_devices_announcing_one_identity_are_taken_out_not_their_neighbours(tmp_path):
    """Device 0 lends its identity to device 1 (it signs device 1's keys): both leave at setup, the other three sum."""
    configs = enrolled(tmp_path, 5)
    lender = load_identity(configs[0]["secagg-identity-key"], configs[0]["secagg-enrolment"])

    def borrow(msg, context, call_next):
        reply = call_next(msg, context)
        config = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is not None and IDENTITY in config:
            keys = (config[Key.PUBLIC_KEY_1], config[Key.PUBLIC_KEY_2])
            proof = prove_keys(lender, context.run_id, msg.metadata.group_id, msg.metadata.dst_node_id, *keys)
            config.update(zip(PROOF_KEYS, (proof.identity, proof.enrolment, proof.signature), strict=True))
        return reply

    ds = deltas(5, seed=25)
    with Fleet(ds, mods={1: [borrow]}, node_configs=dict(enumerate(configs))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    pair = {fleet.nodes[0], fleet.nodes[1]}
    assert set(result.rejected) == pair and all("announced an identity that" in result.rejected[n] for n in pair)
    assert set(result.survivors) == set(fleet.nodes[2:])
    assert_within_quantization(result.total, plain_sum(ds[2:]), 3)


def test_a_device_copying_anothers_proof_takes_only_itself_out(tmp_path):
    """Identities and their proofs travel to every neighbour: a copied proof must not evict its owner."""
    seen = {}

    def squat(msg, context, call_next):  # device 1 announces device 0's proof (its own keys stay)
        reply = call_next(msg, context)
        config = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is not None and IDENTITY in config:
            config.update(seen.setdefault("proof", {k: config[k] for k in PROOF_KEYS}))
        return reply

    ds = deltas(5, seed=26)
    with Fleet(ds, mods={0: [squat], 1: [squat]}, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    copier = fleet.nodes[1]
    assert set(result.rejected) == {copier} and "did not sign these keys" in result.rejected[copier]
    assert fleet.nodes[0] in result.survivors  # was: both out, the owner named for the copier's act
    assert_within_quantization(result.total, plain_sum([d for i, d in enumerate(ds) if i != 1]), 4)


def test_a_revoked_identity_gets_no_shares_and_only_it_leaves(tmp_path):
    configs = enrolled(tmp_path, 5)
    gone = load_identity(configs[2]["secagg-identity-key"], configs[2]["secagg-enrolment"])
    trust = Path(configs[0]["secagg-enrolment-trust"])
    line = public_line(Ed25519PublicKey.from_public_bytes(gone.public))
    trust.write_text(trust.read_text() + f"revoked {line}\n")  # a device lost or gone from the fleet
    ds = deltas(5, seed=27)
    with Fleet(ds, node_configs=dict(enumerate(configs))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert set(result.survivors) == set(fleet.nodes) - {fleet.nodes[2]}
    assert_within_quantization(result.total, plain_sum([d for i, d in enumerate(ds) if i != 2]), 4)


def test_a_neighbour_id_written_another_way_is_refused():
    """'0…', or a digit of another script, would name one node twice in a share-keys message."""

    def alias(msg, context, call_next):
        config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is not None and config[Key.STAGE] == Stage.SHARE_KEYS:
            name = next(k for k in config if k not in (Key.STAGE, str(msg.metadata.dst_node_id)))
            config["0" + name] = config.pop(name)  # the same node, written with a leading zero
        return call_next(msg, context)

    with Fleet(deltas(5, seed=28), mods={0: [alias]}) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert "neighbour id '0" in result.rejected[fleet.nodes[0]]


def test_the_coordinators_release_key_is_refused_as_an_enrolment_authority(tmp_path):
    from client.device import DeviceConfigError, secagg_enrolment

    config = enrolled(tmp_path, 1)[0]
    with pytest.raises(DeviceConfigError, match="a key of this device's release trust list"):
        secagg_enrolment({**config, "trust-file": config["secagg-enrolment-trust"]})
    assert secagg_enrolment(config)[1] is not None  # with no release trust list of its own: nothing to compare


def test_a_devices_own_proof_forwarded_as_a_neighbours_costs_only_that_link(tmp_path):
    """A hostile coordinator copies device 0's proof onto neighbour 1's keys in what it forwards to device 0."""

    def copy_own(msg, context, call_next):
        config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is not None and config[Key.STAGE] == Stage.SHARE_KEYS:
            own = config[str(msg.metadata.dst_node_id)]
            name = next(k for k in config if k not in (Key.STAGE, str(msg.metadata.dst_node_id)))
            config[name] = [*config[name][:2], *own[2:]]
        return call_next(msg, context)

    ds = deltas(5, seed=29)
    with Fleet(ds, mods={0: [copy_own]}, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert fleet.nodes[0] in result.survivors and len(result.survivors) == 5  # was: device 0 refused the round
    assert_within_quantization(result.total, plain_sum(ds), 5)


def test_every_survivor_signs_the_survivors_it_was_told_of_before_any_reveals(tmp_path):
    ds = deltas(5, seed=30)
    with Fleet(ds, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert_within_quantization(result.total, plain_sum(ds), 5)
    configs = [m.content.config_records.get(RECORD_KEY_CONFIGS, {}) for _, m in fleet.received]
    assert sum(len(c.get(STORY_SIGNATURE, b"")) == 64 for c in configs) == 5


def test_a_device_told_a_neighbour_dropped_cannot_make_that_neighbour_reveal(tmp_path):
    """A coordinator telling device 0 that device 1 dropped, and device 1 that device 0 survived.

    Device 1 would reveal device 0's seed share, device 0 device 1's key share: the two halves of
    opening a vector. Device 1 now needs device 0's signed word that device 1 survived, and has not.
    """
    victim = {}

    def lie(msg, context, call_next):  # what device 0 is told at consistency and unmask: device 1 dropped
        config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is not None and config[Key.STAGE] in (CONSISTENCY, Stage.UNMASK):
            other = victim.setdefault(
                "id", sorted(n for n in config[Key.ACTIVE_NODE_ID_LIST] if n != context.node_id)[0]
            )
            config[Key.ACTIVE_NODE_ID_LIST] = [n for n in config[Key.ACTIVE_NODE_ID_LIST] if n != other]
            config[Key.DEAD_NODE_ID_LIST] = [*config[Key.DEAD_NODE_ID_LIST], other]
        return call_next(msg, context)

    with Fleet(deltas(5, seed=31), mods={0: [lie]}, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        with contextlib.suppress(SecAggAbortedError):  # the honest coordinator's sum may not open: not the point
            run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    told = victim["id"]
    errors = [m.error.reason for n, m in fleet.received if n == told and m.has_error()]
    assert any(f"neighbour {fleet.nodes[0]} did not sign that it survived" in e for e in errors), errors
    shares = [m for n, m in fleet.received if n == told and not m.has_error() and Key.SHARE_LIST in
              m.content.config_records.get(RECORD_KEY_CONFIGS, {})]  # fmt: skip
    assert shares == []  # it revealed nothing


def test_an_enrolled_device_sent_to_unmask_without_the_consistency_stage_reveals_nothing(tmp_path):
    def skip(msg, context, call_next):  # a coordinator that leaves device 2 out of the consistency stage
        config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is not None and config[Key.STAGE] == CONSISTENCY:
            return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({STORY_SIGNATURE: b""})}), reply_to=msg)
        return call_next(msg, context)

    ds = deltas(5, seed=32)
    with Fleet(ds, mods={2: [skip]}, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        with contextlib.suppress(SecAggAbortedError):
            run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    errors = [m.error.reason for n, m in fleet.received if n == fleet.nodes[2] and m.has_error()]
    assert any("an unmask without the consistency stage" in e for e in errors), errors


def test_unmask_lists_other_than_the_signed_ones_are_refused(tmp_path):
    def switch(msg, context, call_next):  # the lists change between consistency and unmask
        config = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if config is not None and config[Key.STAGE] == Stage.UNMASK:
            other = max(n for n in config[Key.ACTIVE_NODE_ID_LIST] if n != context.node_id)
            config[Key.ACTIVE_NODE_ID_LIST] = [n for n in config[Key.ACTIVE_NODE_ID_LIST] if n != other]
            config[Key.DEAD_NODE_ID_LIST] = [*config[Key.DEAD_NODE_ID_LIST], other]
        return call_next(msg, context)

    ds = deltas(5, seed=33)
    with Fleet(ds, mods={2: [switch]}, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    errors = [m.error.reason for n, m in fleet.received if n == fleet.nodes[2] and m.has_error()]
    assert any("unmask lists other than the ones it signed" in e for e in errors), errors
    assert_within_quantization(result.total, plain_sum(ds), 5)  # the other four survivors' shares suffice


def test_a_survivor_list_its_identity_did_not_sign_names_that_device(tmp_path, caplog):
    """A device that answers consistency with 64 zero bytes: its neighbours refuse for want of it, and it is named."""

    def garbage(msg, context, call_next):
        reply = call_next(msg, context)
        config = reply.content.config_records.get(RECORD_KEY_CONFIGS) if not reply.has_error() else None
        if config is not None and STORY_SIGNATURE in config:
            config[STORY_SIGNATURE] = bytes(64)
        return reply

    with Fleet(deltas(5, seed=34), mods={2: [garbage]}, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        with contextlib.suppress(SecAggAbortedError):
            run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    named = [r.getMessage() for r in caplog.records if "did not sign the survivor list it was sent" in r.getMessage()]
    assert named and str(fleet.nodes[2]) in named[0]


def test_a_collect_message_of_another_server_round_than_its_group_is_refused(tmp_path):
    """What a device signs names the round by group id; what its replay store keeps is the server round."""

    def renumber(msg, context, call_next):
        config = msg.content.config_records.get("config")
        if config is not None and "server-round" in config:
            config["server-round"] = 2  # the group id stays "1"
        return call_next(msg, context)

    with Fleet(deltas(5, seed=35), mods={0: [renumber]}, node_configs=dict(enumerate(enrolled(tmp_path, 5)))) as fleet:
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)
    assert "group '1' for another round" in result.rejected[fleet.nodes[0]]


def test_a_device_refuses_a_threshold_below_its_own_floor():
    """The coordinator picks the graph: a threshold-t round can reveal the sum of t devices of its choosing."""
    ds = deltas(5, seed=36)
    with Fleet(ds, node_configs={0: {"secagg-min-threshold": "4"}}) as fleet:  # as flower-supernode passes it
        result = run_secagg(fleet.grid, fleet.train_contents(), SHAPES, PARAMS, server_round=1)  # threshold 3
    assert "threshold 3 below secagg-min-threshold" in result.rejected[fleet.nodes[0]]
    assert_within_quantization(result.total, plain_sum(ds[1:]), 4)
