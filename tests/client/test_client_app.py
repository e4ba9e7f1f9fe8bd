"""The ClientApp as Flower calls it: its trust list and base verification are the device's, never the run's."""

import json
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client import client_app
from client.device import FLOAT_BASE_ENV, PINNED_ENV, TRUST_ENV
from shared.adapter import adapter_state, attach_lora
from shared.config import FleetConfig
from shared.model import load_model, model_digest
from shared.release import make_release
from shared.release_records import release_to_records
from shared.replay import AcceptedReleases
from shared.sign import generate_key, load_private_key
from shared.tensors import save_tensors

DATA = Path(__file__).resolve().parents[2] / "simulations" / "data" / "wordnet" / "noun.animal"


@pytest.fixture
def fleet(tmp_path, monkeypatch, tiny_model_dir):
    """An honest coordinator key, an attacker's key, and a device with an empty cache and no device-side env."""
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv(FLOAT_BASE_ENV, raising=False)
    for name in ("honest", "attacker"):
        generate_key(tmp_path / f"{name}.key")
    return tmp_path


def _run_config(fleet, tiny_model_dir):
    # whoever submits the run writes this: it names the attacker's key list and asks for an unverified base
    return {
        "model": str(tiny_model_dir),
        "base.format": "float",
        "signing.trust-file": str(fleet / "attacker.key.pub"),
        "train.steps": 1,
        "train.max-seq-len": 32,
        "run-id": "run-1",  # the run whose releases the device takes (theirs are signed as run-1)
    }


def _release(fleet, tiny_model_dir, signer, run_id="run-1"):
    cfg = FleetConfig.from_run_config(_run_config(fleet, tiny_model_dir))
    model = attach_lora(load_model(str(tiny_model_dir), torch.float32), cfg.lora, cfg.seed)
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": save_tensors(adapter_state(model))}
    release, _ = make_release(
        files,
        kind="adapter",
        run_id=run_id,
        round=0,
        base_digest=model_digest(str(tiny_model_dir)),
        method="fedavg",
        key=load_private_key(fleet / f"{signer}.key"),
    )
    return release


def _send(fleet, run_config, release, node):
    """Call the ClientApp's train as Flower does, with ``release`` in the message; return (refusal, reply)."""
    arrays, signed = release_to_records(release)
    return _deliver(fleet, {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **signed})}, run_config, node)


def _deliver(fleet, content, run_config, node, handler="train"):
    """Call the ClientApp's ``handler`` as Flower does with a message of ``content``; return (refusal, reply)."""
    meta = Metadata(
        run_id=1,
        message_id="q1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600,
        message_type=handler,
    )
    node_config = {
        "train-file": str(DATA / "train.jsonl"),
        "heldout-file": str(DATA / "heldout.jsonl"),
        "name": "dev-1",
        "state-dir": str(fleet / "state"),
        **node,
    }
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    call = client_app.train if handler == "train" else client_app.evaluate_global
    reply = call(Message(RecordDict(content), metadata=meta), context)
    return reply.content["client"].get("refused-release"), reply


def _train(fleet, tiny_model_dir, signer, **node):
    return _send(fleet, _run_config(fleet, tiny_model_dir), _release(fleet, tiny_model_dir, signer), node)


def test_a_run_config_cannot_choose_the_devices_trust_list(fleet, tiny_model_dir):
    refused, _ = _train(fleet, tiny_model_dir, "attacker", **{"allow-float-base": True})
    assert refused and "this device has no trust list" in refused  # the run config's list was not taken
    node = {"allow-float-base": True, "trust-file": str(fleet / "node-list.pub")}
    refused, _ = _train(fleet, tiny_model_dir, "attacker", **node)
    assert refused and "node-list.pub" in refused  # the node config names a list (missing here): only that one counts
    assert str(fleet) not in refused  # the device's folders never leave it


def test_a_refusal_reason_names_the_error_but_no_path_of_the_device():
    missing = FileNotFoundError(2, "No such file or directory", "/home/kiosk/.cache/fleetlora/trust.pub")
    assert client_app.public_reason(missing) == "FileNotFoundError: No such file or directory: trust.pub"
    reason = client_app.public_reason(ValueError("release /home/kiosk/.cache/r1 refused: sha256 of a.bin differs"))
    assert reason == "release <path> refused: sha256 of a.bin differs"


def test_the_device_trusts_only_its_own_list(fleet, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))  # set by whoever starts the SuperNode
    refused, _ = _train(fleet, tiny_model_dir, "attacker", **{"allow-float-base": True})
    assert refused and "not in the trust list" in refused
    refused, reply = _train(fleet, tiny_model_dir, "honest", **{"allow-float-base": True})
    assert refused is None and "arrays" in reply.content  # the honest release installs and trains


@pytest.mark.parametrize("approval", ["app-pins", "app-trust"])
def test_a_device_with_app_pins_not_started_by_the_pin_refuses_to_run(fleet, tiny_model_dir, monkeypatch, approval):
    """The fleet's own app catches a SuperNode started without the pin's flwr-clientapp (it would run any app)."""
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    monkeypatch.delenv(PINNED_ENV, raising=False)
    node = {"allow-float-base": True, approval: str(fleet / approval)}
    refused, _ = _train(fleet, tiny_model_dir, "honest", **node)
    assert refused and "not started by the pin" in refused and "fleetlora device" in refused
    monkeypatch.setenv(PINNED_ENV, "1")  # what client/app_pin.py sets before it runs Flower's ClientApp process
    refused, reply = _train(fleet, tiny_model_dir, "honest", **node)
    assert refused is None and "arrays" in reply.content
    pin_script = (Path(client_app.__file__).parent / "app_pin.py").read_text()
    assert f'PINNED_ENV = "{PINNED_ENV}"' in pin_script  # the pin sets the very variable the device checks


def test_a_run_config_cannot_switch_base_verification_off(fleet, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    refused, _ = _train(fleet, tiny_model_dir, "honest")
    assert refused and "base.format=float" in refused and "allow-float-base=true" in refused


def test_a_device_that_missed_rounds_rejoins_through_the_artifact_service(fleet, tiny_model_dir):
    """An int4 device accepted round 1, missed round 2, and gets round 3 without chain manifests in the message."""
    from server.distribute import serve
    from server.quantize import publish_base
    from shared.release import write_release

    key = load_private_key(fleet / "honest.key")
    _, base = publish_base(tiny_model_dir, model_digest(str(tiny_model_dir)), fleet / "store", key)
    server, port = serve(fleet / "store", "127.0.0.1:0")
    try:
        run_config = {
            **_run_config(fleet, tiny_model_dir),
            "base.format": "int4",
            "base.address": f"127.0.0.1:{port}",
        }
        cfg = FleetConfig.from_run_config(run_config)
        model = attach_lora(load_model(str(fleet / "store" / "base"), torch.float32), cfg.lora, cfg.seed)
        weights = save_tensors(adapter_state(model))
        previous, releases = "", {}
        for n in (1, 2, 3):
            releases[n], manifest = make_release(
                {"adapter_config.json": b"{}", "adapter_model.safetensors": weights},
                kind="adapter", run_id="run-1", round=n, base_digest=base.base_digest, method="fedavg",
                key=key, previous=previous,
            )  # fmt: skip
            write_release(releases[n], fleet / "store" / "adapter" / "run-1" / f"round-{n:04d}")
            previous = manifest.digest()
        node = {"trust-file": str(fleet / "honest.key.pub"), "cache-dir": str(fleet / "device-cache")}
        for n in (1, 3):  # the device is away for round 2
            refused, reply = _send(fleet, run_config, releases[n], node)
            assert refused is None and "arrays" in reply.content, refused
    finally:
        server.stop(None)
    state = AcceptedReleases(fleet / "state" / "accepted.json").runs
    assert state["adapter:run-1"]["round"] == 3 and state["base:base"]["digest"] == base.digest()


def test_record_level_dp_trains_with_dp_sgd_and_reports_the_devices_epsilon(fleet, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    run = {**_run_config(fleet, tiny_model_dir), "dp.level": "record", "dp.noise-multiplier": 1.0}
    run["aggregation.method"] = "ties"  # any method: the coordinator only post-processes DP updates
    refused, reply = _send(fleet, run, _release(fleet, tiny_model_dir, "honest"), {"allow-float-base": True})
    assert refused is None and "arrays" in reply.content
    epsilon = reply.content["metrics"]["dp-record-epsilon"]
    assert epsilon > 0
    assert "train-loss" not in reply.content["metrics"]  # not noised: at batch 1, one example's exact loss
    ledger = json.loads((fleet / "state" / "dp-record-ledger.json").read_text())
    assert ledger["history"] == [[1.0, 4 / 500, 1]]  # z, q = batch / examples, steps


def test_a_round_below_the_devices_privacy_floor_is_refused_and_its_own_epsilon_cap_holds(
    fleet, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    node = {"allow-float-base": True, "require-record-dp": True, "min-noise-multiplier": 0.5}
    weak = {**_run_config(fleet, tiny_model_dir), "dp.level": "record", "dp.noise-multiplier": 0.2}  # dp.max-epsilon 0
    refused, reply = _send(fleet, weak, _release(fleet, tiny_model_dir, "honest"), node)
    assert refused and "below this device's min-noise-multiplier 0.5" in refused and "arrays" not in reply.content
    plain = _run_config(fleet, tiny_model_dir)  # no DP at all: the device's data would train unprotected
    refused, _ = _send(fleet, plain, _release(fleet, tiny_model_dir, "honest"), node)
    assert refused and "only under record-level DP" in refused
    strong = {**weak, "dp.noise-multiplier": 1.0}
    refused, _ = _send(fleet, strong, _release(fleet, tiny_model_dir, "honest"), {**node, "max-epsilon": 1e-9})
    assert refused and "epsilon" in refused  # the run sets no cap; the device's own one stops the training


def test_a_round_asking_more_steps_than_the_devices_ceiling_is_refused_before_training(
    fleet, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    node = {"allow-float-base": True, "max-train-steps": 1}
    run = {**_run_config(fleet, tiny_model_dir), "train.steps": 3}  # a coordinator may ask up to 100,000
    refused, reply = _send(fleet, run, _release(fleet, tiny_model_dir, "honest"), node)
    assert refused and "asks 3 local steps a round, more than this device's max-train-steps 1" in refused
    assert "arrays" not in reply.content
    refused, reply = _send(fleet, _run_config(fleet, tiny_model_dir), _release(fleet, tiny_model_dir, "honest"), node)
    assert refused is None and "arrays" in reply.content  # 1 step: within the ceiling


def test_a_signed_release_of_another_run_is_refused(fleet, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    other = {**_run_config(fleet, tiny_model_dir), "run-id": "run-2"}  # replay protection is per run: run-1's
    refused, _ = _send(fleet, other, _release(fleet, tiny_model_dir, "honest"), {"allow-float-base": True})
    assert refused and "release of run 'run-1' round 0: this round is of run 'run-2'" in refused


def test_a_secure_round_is_masked_once_per_round_of_a_run_even_across_restarts(fleet, tiny_model_dir, monkeypatch):
    """Run twice, with and without one device, a secure round's two sums would differ by that device's delta."""
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    arrays, signed = release_to_records(_release(fleet, tiny_model_dir, "honest"))
    run, node = _run_config(fleet, tiny_model_dir), {"allow-float-base": True}

    def collect(server_round):  # the train content of SecAgg+'s collect stage, as client/secagg.py hands it on
        stage = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: []})
        config = ConfigRecord({"server-round": server_round, **signed})
        return _deliver(fleet, {"arrays": arrays, "config": config, RECORD_KEY_CONFIGS: stage}, run, node)

    refused, reply = collect(3)
    assert refused is None and "arrays" in reply.content
    for again in (3, 2):  # each call a fresh Context: what remembers is the device's replay store, on disk
        refused, reply = collect(again)
        assert refused and f"secure round {again} of run run-1: this device already masked a delta for round 3" in (
            refused
        )
        assert "arrays" not in reply.content
    plain = _deliver(fleet, {"arrays": arrays, "config": ConfigRecord({"server-round": 3, **signed})}, run, node)
    assert plain[0] is None  # a plain round (no delta masked) is not bound by it
    assert collect(4)[0] is None
    store = json.loads((fleet / "state" / "accepted.json").read_text())
    assert store["secure:run-1"] == {"round": 4}


def test_the_same_secure_round_in_another_run_trains_on_other_batches(fleet, tiny_model_dir, monkeypatch):
    """mask_once is per run: a coordinator could run round 1 again as another run, with the same seed and start.

    Had the device trained the same delta there (its seed was crc32(seed/round/name)), the two runs' sums,
    one with the device and one without it, would differ by exactly its delta.
    """
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    stage = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: []})
    deltas = []
    for run_id in ("run-1", "run-2"):
        arrays, signed = release_to_records(_release(fleet, tiny_model_dir, "honest", run_id))
        content = {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **signed}), RECORD_KEY_CONFIGS: stage}
        run = {**_run_config(fleet, tiny_model_dir), "run-id": run_id, "train.max-seq-len": 128}
        refused, reply = _deliver(fleet, content, run, {"allow-float-base": True})
        assert refused is None and "arrays" in reply.content
        deltas.append(reply.content["arrays"].to_torch_state_dict())
    assert deltas[0].keys() == deltas[1].keys()
    assert all(deltas[0][k].shape == deltas[1][k].shape for k in deltas[0])
    diff = max(float((deltas[0][k] - deltas[1][k]).abs().max()) for k in deltas[0])
    assert diff > 1e-6  # other batches: the two sums differ by more than one device's delta


def test_a_secure_round_whose_batch_holds_the_whole_shard_is_refused(fleet, tiny_model_dir, monkeypatch):
    """Every step on all examples: the seed changes nothing, and a rerun without the device would reveal its delta."""
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    arrays, signed = release_to_records(_release(fleet, tiny_model_dir, "honest"))
    stage = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: []})
    content = {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **signed}), RECORD_KEY_CONFIGS: stage}
    run = {**_run_config(fleet, tiny_model_dir), "train.batch-size": 500}  # noun.animal: 500 training examples
    refused, reply = _deliver(fleet, content, run, {"allow-float-base": True})
    assert refused and "trains on all 500 of this device's examples at every step" in refused
    assert "arrays" not in reply.content
    plain = {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **signed})}
    refused, reply = _deliver(fleet, plain, run, {"allow-float-base": True})
    assert refused is None and "arrays" in reply.content  # a plain round: its delta leaves in the clear anyway


def test_a_secure_run_or_device_never_uploads_a_delta_in_the_clear(fleet, tiny_model_dir, monkeypatch):
    """A hostile coordinator sends a plain train message where the run, or the device, asks for secure rounds."""
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    arrays, signed = release_to_records(_release(fleet, tiny_model_dir, "honest"))
    plain = {"arrays": arrays, "config": ConfigRecord({"server-round": 1, **signed})}
    secure_run = {**_run_config(fleet, tiny_model_dir), "aggregation.method": "fedavg", "aggregation.secure": True}
    refused, reply = _deliver(fleet, plain, secure_run, {"allow-float-base": True})
    assert refused and "this device uploads its delta only masked" in refused and "arrays" not in reply.content
    node = {"allow-float-base": True, "require-secure-aggregation": True}
    refused, reply = _deliver(fleet, plain, _run_config(fleet, tiny_model_dir), node)
    assert refused and "trains only in secure rounds" in refused and "arrays" not in reply.content
    stage = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: []})
    refused, reply = _deliver(fleet, {**plain, RECORD_KEY_CONFIGS: stage}, secure_run, node)
    assert refused is None and "arrays" in reply.content  # a secure round's collect: secagg_mod masks it


def test_a_devices_epsilon_cap_holds_at_its_own_delta_whatever_the_runs(fleet, tiny_model_dir, monkeypatch):
    """dp.delta 0.5 (a run config's choice) read one step as epsilon ~0: the device's max-epsilon let it through."""
    from opacus.accountants import RDPAccountant

    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    accountant = RDPAccountant()
    accountant.history = [(1.0, 4 / 500, 1)]  # z, q = batch / examples, steps: one round of this run
    at_own, at_run = accountant.get_epsilon(1e-5), accountant.get_epsilon(0.5)
    assert at_run < at_own / 4  # what the run's delta made of the same step
    node = {"allow-float-base": True, "max-epsilon": at_own / 2}  # dp-delta: 1e-5 by default
    run = {**_run_config(fleet, tiny_model_dir), "dp.level": "record", "dp.noise-multiplier": 1.0, "dp.delta": 0.5}
    release = _release(fleet, tiny_model_dir, "honest")  # one release: the second call gets it again
    refused, reply = _send(fleet, run, release, node)
    assert refused and "exceed dp.max-epsilon" in refused and "arrays" not in reply.content
    refused, reply = _send(fleet, run, release, {**node, "dp-delta": 0.5})
    assert refused is None and reply.content["metrics"]["dp-record-epsilon"] == pytest.approx(at_run, rel=1e-6)
