"""Chaos on a real local fleet: a device, the artifact service and the coordinator killed at random moments.

One seeded schedule, bounded in time, loopback only. Each kill is ``kill -9`` at a random moment
(a seeded delay after a round starts); each victim is started again, as an operator's process
manager would. Afterwards: the chain of signed releases is unbroken and no round is signed
twice; every device holds the latest release; the state store agrees with the releases on disk.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.fleet import LocalFleet, topic_devices
from server.resume import resume_point
from server.state import StateStore
from server.state.queries import run_view
from shared.replay import AcceptedReleases
from shared.sign import TrustList
from tests.processes import processes_with_env

DATA = Path(__file__).resolve().parents[2] / "simulations" / "data" / "wordnet"
# Two devices, a quorum of one: the round a device dies in goes on with the other. A third device would add its
# train and evaluate processes to every round (each a fresh Python with torch) and check nothing more.
TOPICS = ["noun.animal", "verb.motion"]
ROUNDS = 4  # round 4 runs after the coordinator's restart whatever moment of round 3 the kill hit
RUN_TIMEOUT = 1500  # seconds, the whole chaotic run (a quiet 2-core machine: ~6 min)
SEED = 20261201


def _log(fleet: LocalFleet) -> str:
    path = fleet.folder / "logs" / "run.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait(what: str, ok: Callable[[], bool], deadline: float, fleet: LocalFleet) -> None:
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; run log tail:\n{_log(fleet)[-3000:]}")
        time.sleep(0.3)


def _restart(fleet: LocalFleet, device: str, deadline: float) -> None:
    """Start a killed device again once the SuperLink has noticed it is gone, as a process manager would.

    Flower's SuperLink refuses to activate a node it still holds active (its heartbeat has not
    expired: up to 2 x 30 s): a SuperNode started at once exits with code 305.
    """
    _wait(f"the SuperLink to see {device} gone", lambda: device not in fleet.online(), deadline, fleet)
    fleet.start_device(device)
    _wait(f"{device} back online", lambda: device in fleet.online(), deadline, fleet)


@pytest.mark.slow
def test_a_fleet_survives_kills_of_a_device_the_artifact_service_and_the_coordinator(
    tmp_path, monkeypatch, tiny_model_dir
):
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))
    rng = random.Random(SEED)
    overrides = {
        "model": str(tiny_model_dir),
        "run-id": "chaos",
        "num-server-rounds": ROUNDS,
        "min-clients": 1,
        "aggregation.min-accepted": 1,
        "train.steps": 2,
        "eval.max-examples": 8,
        "aggregation.method": "fedavg",
        "round-timeout": 240,
    }
    deadline = time.monotonic() + RUN_TIMEOUT
    with LocalFleet(tmp_path / "fleet", topic_devices(DATA, TOPICS, len(TOPICS)), persistent=True) as fleet:
        run = fleet.start_run(overrides)
        # round 1: a device dies at a random moment and comes back
        _wait("round 1", lambda: "[ROUND 1/" in _log(fleet), deadline, fleet)
        time.sleep(rng.uniform(0, 8))
        victim = rng.choice(TOPICS)
        fleet.stop(f"device-{victim}", sig=signal.SIGKILL)
        _restart(fleet, victim, deadline)
        # round 2: the artifact service dies and comes back (devices fetch their base through it every round)
        _wait("round 2", lambda: "[ROUND 2/" in _log(fleet), deadline, fleet)
        time.sleep(rng.uniform(0, 8))
        fleet.stop("artifacts", sig=signal.SIGKILL)
        time.sleep(rng.uniform(0, 5))
        fleet.start_artifacts()
        # round 3: the coordinator dies (SuperLink, ServerApp, flwr run); restarted, it resumes the run
        _wait("round 3", lambda: "[ROUND 3/" in _log(fleet), deadline, fleet)
        time.sleep(rng.uniform(0, 8))
        fleet.stop("superlink", sig=signal.SIGKILL)
        fleet.stop(f"run-{run.pid}")
        fleet.start_superlink()
        fleet.wait_online()
        data = fleet.run(overrides, timeout=max(60.0, deadline - time.monotonic()))
        assert "finished" in data["run"]

        releases = fleet.folder / "store" / "adapter" / "chaos"
        trust = TrustList.load(fleet.signing_key.with_name("server.key.pub"))
        point = resume_point(releases, trust, "chaos", data["run"]["base_digest"], "fedavg")  # verifies the chain
        assert point is not None and point.round == ROUNDS, f"the last round did not publish: {point}"
        names = sorted(p.name for p in releases.iterdir() if p.is_dir())
        assert names == sorted({f"round-{m.round:04d}" for m in point.manifests})  # no partial or doubled folder
        assert len(point.manifests) == len({m.round for m in point.manifests})  # no round signed twice
        for device in TOPICS:  # each evaluated the last release, verified and recorded it
            state = AcceptedReleases(fleet.folder / "nodes" / device / "state" / "accepted.json").runs["adapter:chaos"]
            assert (state["round"], state["digest"]) == (ROUNDS, point.chain[-1]), device
        store = StateStore(fleet.folder / "outputs" / "state.sqlite", read_only=True)
        signed = store.last_signed_round("chaos")
        assert signed is not None and (signed.round, signed.manifest_digest) == (ROUNDS, point.chain[-1])
        with store.read() as conn:
            view = run_view(conn, "chaos")
        assert view is not None
        recorded = {r["round"]: r["manifest_digest"] for r in view["rounds"] if r["manifest_digest"]}
        assert recorded == {m.round: m.digest() for m in point.manifests}
        store.close()
    assert not processes_with_env("FLEETLORA_CACHE", str(tmp_path / "cache")), "a fleet process outlived the test"
