"""Secure aggregation in a real Flower simulation: the coordinator receives nothing like any one device's delta."""

from pathlib import Path

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import Key

import simulations.flower_local
from server.report import clients_by_name
from simulations.demo import run_demo
from tests.recording_app import RECORD_ENV, read_recordings
from tests.secure_checks import assert_step_is_the_mean, first_step, flat
from tests.test_outgoing_messages import recording_project


@pytest.mark.slow
def test_a_secure_round_reveals_only_the_sum_and_its_mean_is_the_plain_mean(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "device-cache"))
    monkeypatch.setenv(RECORD_ENV, str(tmp_path / "sent"))
    monkeypatch.setattr(simulations.flower_local, "ROOT", recording_project(tmp_path / "project"))
    data = run_demo(
        {
            "signing.key": str(tmp_path / "keys" / "server.key"),
            "signing.trust-file": str(tmp_path / "keys" / "server.key.pub"),
            "model": str(tiny_model_dir),
            "min-clients": 5,
            "num-server-rounds": 1,
            "train.steps": 2,
            "eval.max-examples": 4,
            "aggregation.method": "ffa",
            "aggregation.secure": True,
            "aggregation.secure-clip-range": 0.05,
            "lora.device-ranks": "2,8,8,8,8",  # one device of a lower rank: it pads its delta before masking
            "run-name": "secure",
        },
        output_dir=tmp_path / "out",
        flwr_home=tmp_path / "flwr",
        num_supernodes=5,
    )
    rounds = {r["round"]: r for r in data["rounds"]}
    assert rounds[1]["secure"]["survivors"] == 5 and rounds[1]["secure"]["dropped"] == 0
    assert rounds[1]["secure"]["enrolled"] == 5  # the demo enrols its virtual devices: keys signed, lists checked
    assert all(c["secure"] for c in clients_by_name(rounds[1]).values() if "train_loss" in c)
    assert sorted(str(c.get("lora_rank")) for c in rounds[1]["clients"].values()) == ["2", *["None"] * 4]
    # each device's true delta, recorded inside the SecAgg+ mod, before masking
    true = {m.node_id: m.tensors for m in read_recordings(tmp_path / "sent" / "true") if "arrays" in m.records}
    true = {n: {k.removeprefix("arrays/"): v for k, v in t.items()} for n, t in true.items()}
    assert len(true) == 5
    received = [m for m in read_recordings(tmp_path / "sent") if m.received["message_type"] == "train"]
    assert len(received) == 6 * 5  # six protocol stages (enrolled devices add consistency), five devices
    records = {name.split("/", 1)[0] for m in received for name in m.tensors}
    assert records == {Key.MASKED_PARAMETERS}  # no plain delta ever left a device: only masked vectors
    masked = {m.node_id: m.tensors for m in received if m.tensors}
    assert set(masked) == set(true)
    # what each device sent is counted in the round log: its masked vector and its keys and shares
    up = {c["node_id"]: c["bytes_up"] for c in rounds[1]["clients"].values() if "train_loss" in c}
    for sender, tensors in masked.items():
        vector_bytes = sum(v.nbytes for v in tensors.values())
        assert vector_bytes <= up[sender] < vector_bytes + 64 * 1024, (sender, up[sender], vector_bytes)
    for sender, tensors in masked.items():
        vector = flat({k.split("/", 1)[1]: v for k, v in tensors.items()})  # one device's upload, ~8k entries
        for delta in true.values():  # equal to none, correlated with none (any device's, the sender's too)
            d = flat(delta)
            assert vector.shape == d.shape and not np.array_equal(vector, d)
            assert abs(np.corrcoef(vector, d)[0, 1]) < 0.1, sender  # 9 standard errors at 8k entries
    # the new global is the plain mean of the five true deltas (fp16 releases, quantization ~1e-8)
    releases = Path(data["run"]["releases"])
    mean = assert_step_is_the_mean(releases, true)
    step = first_step(releases, sorted(next(iter(true.values()))))
    assert np.linalg.norm(step - 5 * mean) > np.linalg.norm(mean)  # a mean, not the sum
