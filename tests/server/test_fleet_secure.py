"""A secure round of enrolled devices on a real fleet: SuperLink (TLS, SuperNode auth), SuperNodes, real gRPC.

The in-process SecAgg+ tests (``tests/server/secagg/``) drive the protocol through Flower's own
Grid and LinkState; this one runs it where it is deployed: each of the six exchanges of an
enrolled round (setup, share keys, confirm, collect, consistency, unmask) is a message through
the SuperLink to a SuperNode, a fresh ClientApp process per message, the device's SecAgg+ state
carried between them in its Flower context, its identity and enrolment named by its node config
(``server/fleet.py`` enrols every device). The devices run the product's ClientApp behind a
recording mod (``tests/recording_app.py``): what each one sent, and its delta before masking. Each
runs it only because the run carries the fleet's app-signing key's signature of it (``client/app_pin.py``). A
fourth device, admitted to the SuperLink but enrolled by another authority, gets no shares: the
trust lists in the node configs are what the devices check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.device import secagg_enrolment
from server.fleet import LocalFleet, topic_devices
from server.report import clients_by_name
from shared.enrolment import enrol_identity
from shared.secagg_stages import IDENTITY, STORY_SIGNATURE
from shared.sign import TrustList, generate_key, load_private_key
from tests.processes import processes_with_env
from tests.recording_app import RECORD_ENV, SentMessage, read_recordings
from tests.secure_checks import assert_step_is_the_mean, flat
from tests.test_outgoing_messages import recording_project

DATA = Path(__file__).resolve().parents[2] / "simulations" / "data" / "wordnet"
TOPICS = ["noun.animal", "verb.motion", "noun.food"]  # three enrolled devices: the default threshold (3) sums them
OUTSIDER = "noun.artifact"  # admitted to the SuperLink, but enrolled by another authority than the fleet's
RUN_TIMEOUT = 900  # seconds: the hard bound of the run (~22 app processes, each a fresh Python with torch)


class _FleetWithOutsider(LocalFleet):
    """A fleet whose device OUTSIDER holds an enrolment by an authority of its own (its trust list: the fleet's)."""

    def make_keys(self) -> None:
        super().make_keys()
        other = self.folder / "other-authority.key"
        enrol_identity(load_private_key(other) if other.exists() else generate_key(other), *self.identity(OUTSIDER))


def _sent(m: SentMessage, key: str) -> bytes | None:
    """The bytes value ``key`` of a recorded SecAgg+ reply's config record, if it sent one."""
    value = m.records.get(RECORD_KEY_CONFIGS, {}).get("values", {}).get(key)
    return None if value is None else bytes.fromhex(value["value"])


@pytest.mark.slow
def test_an_enrolled_fleet_sums_a_secure_round_over_the_superlink_and_only_masked_vectors_leave(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "sent"))
    overrides = {
        "model": str(tiny_model_dir),
        "num-server-rounds": 1,
        "min-clients": len(TOPICS) + 1,
        "train.steps": 2,
        "eval.max-examples": 4,
        "fraction-evaluate": 0.0,  # train only
        "aggregation.method": "fedavg",
        "aggregation.secure": True,
    }
    app = recording_project(tmp_path / "project")
    devices = topic_devices(DATA, [*TOPICS, OUTSIDER], len(TOPICS) + 1)
    # the devices run only apps the fleet's app-signing key signed; the run carries its signature of this one
    # (client/app_pin.py; tests/server/test_fleet_pin.py)
    with _FleetWithOutsider(tmp_path / "fleet", devices, app_dir=app, app_key=tmp_path / "app.key") as fleet:
        data = fleet.run(overrides, timeout=RUN_TIMEOUT)
        identities = {name: fleet.identity(name)[0] for name in TOPICS}
        node_ids = dict(fleet.node_ids)
        logs = (fleet.folder / "logs").glob("device-*")
        pinned = {p.stem: p.read_text(errors="replace").count("is signed by 'fleet'; loading it") for p in logs}
    assert not processes_with_env("FLEETLORA_CACHE", str(tmp_path / "cache")), "a fleet process outlived the test"
    rounds = {r["round"]: r for r in data["rounds"]}
    secure = rounds[1]["secure"]
    assert (secure["survivors"], secure["enrolled"], secure["recovered"], secure["dropped"]) == (3, 3, 0, 1)
    trained = {name: c for name, c in clients_by_name(rounds[1]).items() if "train_loss" in c}
    assert sorted(trained) == sorted(TOPICS) and all(trained[n]["secure"] for n in TOPICS)

    recorded = [m for m in read_recordings(tmp_path / "sent") if m.received["message_type"] == "train"]
    received = [m for m in recorded if m.node_id != node_ids[OUTSIDER]]
    assert all(pinned[f"device-{name}"] == 6 for name in TOPICS), pinned  # every task ran the pinned app
    assert len(received) == 6 * 3 and not [m.error for m in received if m.error]  # six exchanges, three devices
    # the outsider's keys got no shares from the enrolled devices (their trust lists name only the fleet's
    # authority): it never reached collect, and nothing it could have masked is in the sum
    assert not [m for m in recorded if m.node_id == node_ids[OUTSIDER] and m.tensors]
    # setup: each device announced its keys with the identity its node config names (its enrolment checked by the
    # others); consistency: each signed the survivor list it was told of, before any device revealed a share
    for name, key in identities.items():
        public = TrustList.load(Path(f"{key}.pub")).trusted.popitem()[1]
        mine = [m for m in received if m.node_id == node_ids[name]]
        assert [v for m in mine if (v := _sent(m, IDENTITY)) is not None] == [public], name
        signatures = [v for m in mine if (v := _sent(m, STORY_SIGNATURE)) is not None]
        assert len(signatures) == 1 and len(signatures[0]) == 64, name

    # no plain delta left a device: only masked vectors, none like any device's true delta
    true = {m.node_id: {k.removeprefix("arrays/"): v for k, v in m.tensors.items()}
            for m in read_recordings(tmp_path / "sent" / "true") if "arrays" in m.records}  # fmt: skip
    masked = {m.node_id: {k.split("/", 1)[1]: v for k, v in m.tensors.items()} for m in received if m.tensors}
    assert sorted(true) == sorted(masked) == sorted(node_ids[name] for name in TOPICS)
    assert {name.split("/", 1)[0] for m in received for name in m.tensors} == {Key.MASKED_PARAMETERS}
    for sender, vector in masked.items():
        for delta in true.values():
            assert abs(np.corrcoef(flat(vector), flat(delta))[0, 1]) < 0.1, sender

    # the signed release's step is the mean of the three true deltas
    assert_step_is_the_mean(Path(data["run"]["releases"]), true)


def test_a_fleet_keeps_its_devices_identities_and_enrols_them_by_the_authority_its_trust_list_names(tmp_path):
    fleet = LocalFleet(tmp_path / "fleet", topic_devices(DATA, TOPICS, len(TOPICS)))
    fleet.make_keys()
    before = {name: secagg_enrolment(fleet.node_config(name))[0] for name in TOPICS}
    stale = (Path(f"{fleet.authority_key}.pub")).read_bytes()
    generate_key(fleet.authority_key, force=True)  # the authority rotated; its old .pub put back beside it
    Path(f"{fleet.authority_key}.pub").write_bytes(stale)
    fleet.make_keys()
    for name in TOPICS:
        identity, trust = secagg_enrolment(fleet.node_config(name))
        assert identity is not None and trust is not None
        assert identity.public == before[name].public  # the device keeps its identity
        assert list(trust.trusted.values()) == [identity.enrolment[:32]]  # enrolled by the key its list names
        assert identity.enrolment != before[name].enrolment
