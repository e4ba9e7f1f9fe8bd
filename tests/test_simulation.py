"""Real Flower simulations (``flwr run`` through a SuperLink we start and stop by PID)."""

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from shared.config import ConfigError
from shared.release import read_release, verify_release
from shared.sign import TrustList, generate_key
from simulations.demo import run_demo


def _flower_processes() -> list[str]:
    names = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp", "raylet", "gcs_server")
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in names):
            found.append(cmd)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("method", "encoding"), [("fedavg", "fp16"), ("ffa", "q8")])
def test_two_round_simulation_with_a_tiny_model(tmp_path, tiny_model_dir, method, encoding, monkeypatch):
    assert not _flower_processes(), "a Flower process was already running"
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "device-cache"))  # the devices' caches (base, releases)
    data = run_demo(
        {
            "signing.key": str(tmp_path / "keys" / "server.key"),
            "signing.trust-file": str(tmp_path / "keys" / "server.key.pub"),
            "aggregation.method": method,
            "aggregation.delta-encoding": encoding,
            "model": str(tiny_model_dir),
            "num-server-rounds": 2,
            "train.steps": 3,
            "train.lr": 5e-3,
            "eval.max-examples": 16,
            "run-name": "tiny",
        },
        output_dir=tmp_path / "out",
        flwr_home=tmp_path / "flwr",
    )
    rounds = {r["round"]: r for r in data["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    topics = {"noun.animal", "noun.food", "noun.artifact", "verb.motion"}
    for n in (1, 2):
        assert set(rounds[n]["clients"]) == topics
        for c in rounds[n]["clients"].values():
            assert c["num_examples"] == 500 and c["train_loss"] > 0 and c["heldout_loss"] > 0
            assert 0 < c["bytes_up"] < 1_000_000  # only the tiny adapter's delta travels
            if method == "ffa":  # B only, 8-bit: ~1/4 of the fp16 adapter, plus each small array's .npy header
                assert c["bytes_up"] < 0.35 * c["bytes_down"]
            else:  # fp16 delta up; down, the signed release: fp16 safetensors + config + manifest + signature
                assert 0.9 * c["bytes_down"] < c["bytes_up"] < c["bytes_down"]
    assert rounds[2]["mean_heldout_loss"] < rounds[0]["mean_heldout_loss"]
    adapter = tmp_path / "out" / "tiny" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    on_disk = json.loads((tmp_path / "out" / "tiny" / "rounds.json").read_text())
    assert on_disk["run"]["finished"] > on_disk["run"]["started"]
    # the 4-bit base travelled once, through the artifact service, never in a round message
    base = Path(data["run"]["releases"]).parents[1] / "base"
    base_bytes = sum(p.stat().st_size for p in base.iterdir() if not p.name.startswith("manifest"))
    assert data["run"]["base_format"] == "int4"
    assert sum(c.get("base_download_bytes", 0) for c in rounds[1]["clients"].values()) == base_bytes
    assert all(c.get("base_download_bytes", 0) == 0 for c in rounds[2]["clients"].values())
    assert all(c["bytes_down"] < base_bytes / 2 for n in (1, 2) for c in rounds[n]["clients"].values())
    # every round's adapter was signed, chained and is verifiable from the registry
    trust = TrustList.load(tmp_path / "keys" / "server.key.pub")
    releases = Path(data["run"]["releases"])
    manifests = [
        verify_release(read_release(releases / f"round-{n:04d}"), trust, data["run"]["base_digest"]) for n in range(3)
    ]
    assert [m.previous for m in manifests[1:]] == [m.digest() for m in manifests[:2]]
    assert [rounds[n]["release"]["manifest"] for n in range(3)] == [m.digest() for m in manifests]
    for n in (1, 2):
        assert all("refused_release" not in c for c in rounds[n]["clients"].values())
    assert not _flower_processes(), "the SuperLink (or a child) outlived the run"


@pytest.mark.slow
def test_devices_refuse_releases_signed_by_a_key_they_do_not_trust(tmp_path, tiny_model_dir):
    generate_key(tmp_path / "other.key")
    data = run_demo(
        {
            "signing.key": str(tmp_path / "server.key"),
            "signing.trust-file": str(tmp_path / "other.key.pub"),  # the devices trust another key
            "model": str(tiny_model_dir),
            "num-server-rounds": 1,
            "train.steps": 1,
            "eval.max-examples": 4,
            "run-name": "untrusted",
        },
        output_dir=tmp_path / "out",
        flwr_home=tmp_path / "flwr",
    )
    rounds = {r["round"]: r for r in data["rounds"]}
    for n in (0, 1):  # the initial evaluation and the round: every device refused, none trained or scored
        assert len(rounds[n]["clients"]) == 4
        for c in rounds[n]["clients"].values():
            assert "not in the trust list" in c["refused_release"]
            assert "train_loss" not in c and "heldout_loss" not in c
    assert "finished" in data["run"]  # the server went on; the global adapter stayed release 0
    assert not (Path(data["run"]["releases"]) / "round-0001").exists()


def test_unknown_config_key_fails_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown run-config key 'train\.stepz'"):
        run_demo({"train.stepz": 2}, output_dir=tmp_path, flwr_home=tmp_path / "flwr")
    assert not (tmp_path / "flwr").exists()


def test_demo_cli_reports_a_bad_value_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.demo", "--run-config", "lora.rank=0", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "run-config 'lora.rank' = 0 must be >= 1" in proc.stderr


def test_the_demo_serves_the_dashboard_and_runs_on_without_it_if_its_port_is_taken(tmp_path, capsys):
    from simulations.demo import start_dashboard

    db = tmp_path / "state.sqlite"
    served = start_dashboard("127.0.0.1:0", db)
    assert served is not None
    try:
        assert f"watch the rounds live at {served.url}" in capsys.readouterr().err
        assert start_dashboard(f"127.0.0.1:{served.port}", db) is None  # taken: the demo goes on without it
        assert f"watch with: fleetlora dashboard --db {db}" in capsys.readouterr().err
    finally:
        served.stop()
    assert start_dashboard("off", db) is None
