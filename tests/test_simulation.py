"""Real Flower simulations (``flwr run`` through a SuperLink we start and stop by PID)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from server.config_args import config_arg
from server.processes import free_port, stop_pid
from server.report import clients_by_name
from server.state import StateStore
from server.state.queries import run_view
from shared.config import ConfigError
from shared.release import read_release, verify_release
from shared.sign import TrustList
from simulations.demo import RAY_RETRY_PAUSE_S, RAY_STARTUP_ATTEMPTS, RAY_STARTUP_FAILURE, run_demo
from simulations.flower_local import ROOT
from tests.processes import processes_with_env

# Two devices are enough for what these runs check (each device's reply, the aggregate of several); every
# device more adds its own train and evaluate steps to every round of every run.
TOPICS = ("noun.animal", "verb.motion")


class DemoRun(NamedTuple):
    """A finished demo run: its folder (``keys/``, ``out/``, ``flwr/``, ``device-cache/``) and its round log."""

    folder: Path
    data: dict[str, Any]


def _flower_processes(flwr_home: Path) -> dict[int, str]:
    """The processes of the run this test started: every Flower process (and Ray's) inherits its ``FLWR_HOME``."""
    return processes_with_env("FLWR_HOME", str(flwr_home))


def _tiny(folder: Path, tiny_model_dir: Path, **settings: Any) -> dict[str, Any]:
    """Return these tests' run config: the tiny model, keys in ``folder``, 2 rounds of 3 steps, then ``settings``."""
    return {
        "signing.key": str(folder / "keys" / "server.key"),
        "signing.trust-file": str(folder / "keys" / "server.key.pub"),
        "model": str(tiny_model_dir),
        "topics": ",".join(TOPICS),
        "min-clients": len(TOPICS),
        "num-server-rounds": 2,
        "train.steps": 3,
        "train.lr": 5e-3,
        "eval.max-examples": 16,
        **settings,
    }


def _two_round_run(folder: Path, tiny_model_dir: Path, method: str, encoding: str) -> DemoRun:
    """Run the demo for 2 rounds of ``method`` with ``encoding`` deltas on two devices, in ``folder``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEETLORA_CACHE", str(folder / "device-cache"))  # the devices' caches (base, releases)
        settings = {"aggregation.method": method, "aggregation.delta-encoding": encoding, "run-name": "tiny"}
        data = run_demo(
            _tiny(folder, tiny_model_dir, **settings),
            output_dir=folder / "out",
            flwr_home=folder / "flwr",
        )
    return DemoRun(folder, data)


# One run per scenario, module-scoped: the fedavg run is also the demo that the README's by-hand run follows.
@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> DemoRun:
    return _two_round_run(tmp_path_factory.mktemp("fedavg"), tiny_model_dir, "fedavg", "fp16")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "encoding"), [("fedavg", "fp16")])  # ffa + q8: the async run below
def test_two_round_simulation_with_a_tiny_model(request, method, encoding):
    run: DemoRun = request.getfixturevalue(f"{method}_run")
    folder, data = run.folder, run.data
    assert data["run"]["config"]["aggregation.delta-encoding"] == encoding
    rounds = {r["round"]: r for r in data["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    for n in (1, 2):
        assert set(clients_by_name(rounds[n])) == set(TOPICS)
        for c in rounds[n]["clients"].values():
            assert c["num_examples"] == 500 and c["train_loss"] > 0 and c["heldout_loss"] > 0
            assert 0 < c["bytes_up"] < 1_000_000  # only the tiny adapter's delta travels
            if method == "ffa":  # B only, 8-bit: ~1/4 of the fp16 adapter, plus each small array's .npy header
                assert c["bytes_up"] < 0.35 * c["bytes_down"]
            else:  # fp16 delta up; down, the signed release: fp16 safetensors + config + manifest + signature
                assert 0.9 * c["bytes_down"] < c["bytes_up"] < c["bytes_down"]
    assert rounds[2]["mean_heldout_loss"] < rounds[0]["mean_heldout_loss"]
    adapter = folder / "out" / "tiny" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    on_disk = json.loads((folder / "out" / "tiny" / "rounds.json").read_text())
    assert on_disk["run"]["finished"] > on_disk["run"]["started"]
    # the 4-bit base travelled once, through the artifact service, never in a round message
    base = Path(data["run"]["releases"]).parents[1] / "base"
    base_bytes = sum(p.stat().st_size for p in base.iterdir() if not p.name.startswith("manifest"))
    assert data["run"]["base_format"] == "int4"
    assert sum(c.get("base_download_bytes", 0) for c in rounds[1]["clients"].values()) == base_bytes
    assert all(c.get("base_download_bytes", 0) == 0 for c in rounds[2]["clients"].values())
    assert all(c["bytes_down"] < base_bytes / 2 for n in (1, 2) for c in rounds[n]["clients"].values())
    # every round's adapter was signed, chained and is verifiable from the registry
    trust = TrustList.load(folder / "keys" / "server.key.pub")
    releases = Path(data["run"]["releases"])
    manifests = [
        verify_release(read_release(releases / f"round-{n:04d}"), trust, data["run"]["base_digest"]) for n in range(3)
    ]
    assert [m.previous for m in manifests[1:]] == [m.digest() for m in manifests[:2]]
    assert [rounds[n]["release"]["manifest"] for n in range(3)] == [m.digest() for m in manifests]
    for n in (1, 2):
        assert all("refused_release" not in c for c in rounds[n]["clients"].values())
    assert not _flower_processes(folder / "flwr"), "the SuperLink (or a child) outlived the run"


@pytest.mark.slow
def test_a_differentially_private_run_clips_noises_and_records_epsilon_every_round(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "device-cache"))
    data = run_demo(
        _tiny(
            tmp_path,
            tiny_model_dir,
            **{
                "aggregation.method": "fedavg",
                "run-name": "dp",
                "dp.noise-multiplier": 0.1,
                "dp.clip-norm": 0.05,  # below the tiny model's 3-step deltas: every update is clipped
                "dp.max-epsilon": 1e4,
            },
        ),
        output_dir=tmp_path / "out",
        flwr_home=tmp_path / "flwr",
    )
    rounds = {r["round"]: r for r in data["rounds"]}
    privacy = data["run"]["privacy"]
    assert (
        privacy["population"] == len(TOPICS) and privacy["sampling_rate"] == 1.0 and privacy["noise_multiplier"] == 0.1
    )
    epsilons = [rounds[n]["privacy"]["epsilon"] for n in (1, 2)]
    assert 0 < epsilons[0] < epsilons[1] <= 1e4  # spent round by round
    for n in (1, 2):
        assert rounds[n]["privacy"]["clipped_fraction"] == 1.0
        assert all(
            c["clipped"] and c["update_norm"] > 0.05 for c in rounds[n]["clients"].values() if "update_norm" in c
        )
        assert rounds[n]["mean_heldout_loss"] > 0
    assert "privacy" not in rounds[0]  # the initial adapter holds no device's data
    store = StateStore(tmp_path / "out" / "state.sqlite", read_only=True)  # what the dashboard shows
    with store.read() as conn:
        view = run_view(conn, data["run"]["run_id"])
    store.close()
    assert [r["privacy"]["epsilon"] for r in view["rounds"] if r["privacy"]] == pytest.approx(epsilons)
    trust = TrustList.load(tmp_path / "keys" / "server.key.pub")
    verify_release(read_release(Path(data["run"]["releases"]) / "round-0002"), trust, data["run"]["base_digest"])
    assert not _flower_processes(tmp_path / "flwr")


@pytest.mark.slow
def test_devices_refuse_releases_signed_by_a_key_they_do_not_trust(untrusted_run):
    data, _, cfg = untrusted_run  # the devices trust another key than the one that signs (tests/conftest.py)
    rounds = {r["round"]: r for r in data["rounds"]}
    for n in (0, 1):  # the initial evaluation and the round: every device refused, none trained or scored
        assert len(rounds[n]["clients"]) == len(cfg.topics) >= 2
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
    assert "run-config 'lora.rank' = 0 must be in [1, 4096]" in proc.stderr


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


def _readme_by_hand_commands() -> str:
    """The bash block of the README's "Running Flower yourself" section, continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running Flower yourself", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ")


@pytest.mark.slow
def test_the_readmes_by_hand_flwr_run_works_after_the_demo(tmp_path, tiny_model_dir, monkeypatch, fedavg_run):
    # `make demo` first: the fedavg run above is that demo (its Flower home, signing key and device cache)
    flwr_home, cache, keys = fedavg_run.folder / "flwr", fedavg_run.folder / "device-cache", fedavg_run.folder / "keys"
    monkeypatch.setenv("FLEETLORA_CACHE", str(cache))
    tiny = {
        "signing.key": str(keys / "server.key"),
        "signing.trust-file": str(keys / "server.key.pub"),
        "model": str(tiny_model_dir),
        "num-server-rounds": 1,
        "train.steps": 1,
        "eval.max-examples": 4,
        "aggregation.method": "fedavg",
    }

    commands = _readme_by_hand_commands()
    assert "FLWR_HOME=$PWD/.flwr" in commands and "flwr run . --stream" in commands
    commands = commands.replace("FLWR_HOME=$PWD/.flwr", f"FLWR_HOME={flwr_home}")  # this test's Flower home
    # the same command with the tiny model, this test's folders and a free artifact port (a user changes nothing)
    extra = {**tiny, "run-name": "by-hand", "output-dir": str(tmp_path / "by-hand")}
    extra["base.address"] = f"127.0.0.1:{free_port()}"
    commands = commands.rstrip() + f" --run-config '{config_arg(extra)}'"
    env = {
        **os.environ,
        # Flower's local SuperLink listens on fixed ports unless told otherwise: free ones, so no other SuperLink
        # on this machine is used or disturbed
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    try:
        for attempt in range(1, RAY_STARTUP_ATTEMPTS + 1):  # as `make demo` does: Ray's own start may time out
            proc = subprocess.run(["bash", "-c", commands], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=900)  # fmt: skip
            output = proc.stdout + proc.stderr
            if RAY_STARTUP_FAILURE not in output or attempt == RAY_STARTUP_ATTEMPTS:
                break
            time.sleep(RAY_RETRY_PAUSE_S)  # no device ran: Ray's raylet or GCS did not come up in its window
        assert "Connection to the SuperLink is unavailable" not in output
        assert proc.returncode == 0, output[-3000:]
        data = json.loads((tmp_path / "by-hand" / "by-hand" / "rounds.json").read_text())
        assert "finished" in data["run"], output[-3000:]
        assert sorted(r["round"] for r in data["rounds"]) == [0, 1]
        assert "Starting local SuperLink" in output  # Flower's own local SuperLink, as the README says
    finally:  # that SuperLink is detached and keeps running, as the README says: stop the one this test started
        for pid in _flower_processes(flwr_home):
            stop_pid(pid)
    assert not _flower_processes(flwr_home)


@pytest.mark.slow
def test_an_async_ffa_run_signs_one_release_per_buffer_in_one_chain(tmp_path, tiny_model_dir, monkeypatch):
    """FedBuff in a real simulation: 3 devices at once, a buffer of 2, device 2 five times slower (by construction).

    Which updates make which release depends on the machine's timing: this checks what must hold
    whatever it is (the deterministic case, a stale update weighted, is ``tests/server/test_async_rounds.py``).
    FFA-LoRA with 8-bit deltas: only B travels, a quarter of its fp16 size.
    """
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "device-cache"))
    data = run_demo(
        _tiny(
            tmp_path,
            tiny_model_dir,
            **{
                "aggregation.method": "ffa",
                "aggregation.delta-encoding": "q8",
                "aggregation.mode": "async",
                "aggregation.buffer-size": 2,
                "train.device-slowdown": "1,1,5",
                "min-clients": 3,
                "num-server-rounds": 3,
                "run-name": "async",
            },
        ),
        output_dir=tmp_path / "out",
        flwr_home=tmp_path / "flwr",
        num_supernodes=3,
        parallel=3,  # the three devices at once, as three machines
    )
    rounds = {r["round"]: r for r in data["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    for n in (1, 2, 3):
        counted = [c for c in rounds[n]["clients"].values() if "train_loss" in c and "rejected" not in c]
        assert len(counted) == 2 and rounds[n]["buffer"] == {"size": 2, "updates": 2}
        for c in counted:  # each names the release it trained on; its staleness is the releases signed since
            assert 0 <= c["staleness"] <= 4 and c["release_round"] == n - 1 - c["staleness"]
            assert c["bytes_up"] < 0.35 * c["bytes_down"]  # FFA: B only, 8-bit
    assert len(clients_by_name(rounds[3])) == 3 and rounds[3]["mean_heldout_loss"] < rounds[0]["mean_heldout_loss"]
    trust = TrustList.load(tmp_path / "keys" / "server.key.pub")
    releases = Path(data["run"]["releases"])
    manifests = [
        verify_release(read_release(releases / f"round-{n:04d}"), trust, data["run"]["base_digest"]) for n in range(4)
    ]
    assert [m.previous for m in manifests[1:]] == [m.digest() for m in manifests[:3]]  # one linear chain
    assert not _flower_processes(tmp_path / "flwr"), "the SuperLink (or a child) outlived the run"
