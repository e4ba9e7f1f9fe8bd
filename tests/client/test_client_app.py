"""The ClientApp as Flower calls it: its trust list and base verification are the device's, never the run's."""

import time
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from client import client_app
from client.device import FLOAT_BASE_ENV, TRUST_ENV
from shared.adapter import adapter_state, attach_lora
from shared.config import FleetConfig
from shared.model import load_model, model_digest
from shared.release import make_release, save_tensors
from shared.release_records import release_to_records
from shared.sign import generate_key, load_private_key

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
    }


def _message(fleet, tiny_model_dir, signer):
    cfg = FleetConfig.from_run_config(_run_config(fleet, tiny_model_dir))
    model = attach_lora(load_model(str(tiny_model_dir), torch.float32), cfg.lora, cfg.seed)
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": save_tensors(adapter_state(model))}
    release, _ = make_release(
        files,
        kind="adapter",
        run_id="run-1",
        round=0,
        base_digest=model_digest(str(tiny_model_dir)),
        method="fedavg",
        key=load_private_key(fleet / f"{signer}.key"),
    )
    arrays, signed = release_to_records(release)
    meta = Metadata(
        run_id=1,
        message_id="q1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600,
        message_type="train",
    )
    config = ConfigRecord({"server-round": 1, **signed})
    return Message(RecordDict({"arrays": arrays, "config": config}), metadata=meta)


def _train(fleet, tiny_model_dir, signer, **node):
    node_config = {
        "train-file": str(DATA / "train.jsonl"),
        "heldout-file": str(DATA / "heldout.jsonl"),
        "name": "dev-1",
        "state-dir": str(fleet / "state"),
        **node,
    }
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=_run_config(fleet, tiny_model_dir)
    )
    reply = client_app.train(_message(fleet, tiny_model_dir, signer), context)
    client = reply.content["client"]
    return client.get("refused-release"), reply


def test_a_run_config_cannot_choose_the_devices_trust_list(fleet, tiny_model_dir):
    refused, _ = _train(fleet, tiny_model_dir, "attacker", **{"allow-float-base": True})
    assert refused and "this device has no trust list" in refused  # the run config's list was not taken
    node = {"allow-float-base": True, "trust-file": str(fleet / "node-list.pub")}
    refused, _ = _train(fleet, tiny_model_dir, "attacker", **node)
    assert refused and "node-list.pub" in refused  # the node config names a list (missing here): only that one counts


def test_the_device_trusts_only_its_own_list(fleet, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))  # set by whoever starts the SuperNode
    refused, _ = _train(fleet, tiny_model_dir, "attacker", **{"allow-float-base": True})
    assert refused and "not in the trust list" in refused
    refused, reply = _train(fleet, tiny_model_dir, "honest", **{"allow-float-base": True})
    assert refused is None and "arrays" in reply.content  # the honest release installs and trains


def test_a_run_config_cannot_switch_base_verification_off(fleet, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(TRUST_ENV, str(fleet / "honest.key.pub"))
    refused, _ = _train(fleet, tiny_model_dir, "honest")
    assert refused and "base.format=float" in refused and "allow-float-base=true" in refused
