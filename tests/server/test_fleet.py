"""Resilience of a real fleet on loopback (SuperLink with TLS + SuperNode auth, 2 SuperNodes, TLS artifact service).

Each test starts its own :class:`LocalFleet` in a temp folder with the tiny model, breaks
something on purpose (kills a device, freezes one, kills the coordinator), and checks the run
from its round log and its signed releases. Every wait is bounded; the fleet's context manager
stops every process it started, also when an assertion fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from server.fleet import LocalFleet, topic_devices
from server.processes import tree
from server.report import clients_by_name
from server.resume import resume_point
from server.state import StateStore
from server.state.queries import run_view
from shared.release import read_release
from shared.replay import AcceptedReleases
from shared.sign import TrustList
from tests.processes import processes_with_env

DATA = Path(__file__).resolve().parents[2] / "simulations" / "data" / "wordnet"
# Two devices, a quorum of one (min-clients, aggregation.min-accepted): the round the victim fails goes on with the
# other. A third device would add its app processes (each a fresh Python with torch) to every round, checking nothing
# more.
TOPICS = ["noun.animal", "verb.motion"]
VICTIM = "verb.motion"
RUN_TIMEOUT = 900  # seconds: the hard bound of one run (measured 3-5 min on a 2-core machine at load 10)
ROUND_TIMEOUT = 240  # seconds: long enough for a healthy device at that load, far below RUN_TIMEOUT
SLOW_ROUND_TIMEOUT = 150  # the slow-device round lasts exactly this long; a healthy tiny round is ~20 s quiet


def _overrides(tiny_model_dir: Path, **extra: object) -> dict[str, object]:
    return {
        "model": str(tiny_model_dir),
        "num-server-rounds": 3,
        "min-clients": 1,
        "aggregation.min-accepted": 1,
        "train.steps": 2,
        "eval.max-examples": 8,
        "fraction-evaluate": 0.0,  # train only: halves the app processes each round starts
        "aggregation.method": "fedavg",
        **extra,
    }


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))
    devices = topic_devices(DATA, TOPICS, len(TOPICS))
    with LocalFleet(tmp_path / "fleet", devices, persistent=True) as f:  # a coordinator that can restart
        yield f
    assert not _our_processes(tmp_path), "a fleet process outlived the test"


def _our_processes(tmp_path: Path) -> dict[int, str]:
    """Every process of this test's fleet: all of them inherit the test's ``FLEETLORA_CACHE``."""
    return processes_with_env("FLEETLORA_CACHE", str(tmp_path / "cache"))


def _wait(what: str, ok: Callable[[], bool], timeout: float, fleet: LocalFleet) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            log = (fleet.folder / "logs" / "run.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; run log tail:\n{log}")
        time.sleep(0.3)


def _run_log(fleet: LocalFleet) -> str:
    path = fleet.folder / "logs" / "run.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _apps(fleet: LocalFleet, device: str) -> list[psutil.Process]:
    """The device's ClientApp processes (evaluation is off: the first one of a run trains round 1)."""
    proc = fleet.procs.get(f"device-{device}")
    return [p for p in tree(proc.pid) if any("flwr-clientapp" in part for part in _cmdline(p))] if proc else []


@contextlib.contextmanager
def _busy_cache(fleet: LocalFleet, device: str) -> Iterator[None]:
    """Make ``device`` slow by construction: hold its release cache's lock until the block ends.

    Every ClientApp process of the device starts by fetching the base into that cache under
    ``fetch_release``'s exclusive lock (one fetcher per cache), so it waits there, before any
    work, however fast the CPU is: what a device busy with another download looks like. The
    device stays alive meanwhile (its SuperNode's and its app's task heartbeats go on).
    """
    cache = fleet.folder / "nodes" / device / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _alive(procs: list[psutil.Process]) -> bool:
    try:
        return bool(procs) and all(p.status() != psutil.STATUS_ZOMBIE for p in procs)
    except psutil.Error:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _finish(fleet: LocalFleet, run, overrides: dict[str, object]) -> dict:
    try:
        run.wait(timeout=RUN_TIMEOUT)
    finally:
        fleet.stop(f"run-{run.pid}")
    return fleet.round_log(overrides, check=True)


@pytest.mark.slow
def test_a_device_killed_mid_round_is_left_out_then_rejoins_on_the_latest_release(fleet, tiny_model_dir):
    overrides = _overrides(tiny_model_dir, **{"run-id": "killed-device", "round-timeout": ROUND_TIMEOUT})
    run = fleet.start_run(overrides)
    _wait("the victim's round-1 training", lambda: bool(_apps(fleet, VICTIM)), RUN_TIMEOUT, fleet)
    fleet.stop(f"device-{VICTIM}", sig=signal.SIGKILL)  # kill -9 the SuperNode and its app mid-round
    _wait("round 1's aggregate", lambda: "round 1: aggregated" in _run_log(fleet), RUN_TIMEOUT, fleet)
    fleet.start_device(VICTIM)  # it comes back: same identity, cache and state
    data = _finish(fleet, run, overrides)

    rounds = {r["round"]: r for r in data["rounds"]}
    assert sorted(rounds) == [0, 1, 2, 3]
    trained_1 = {n for n, c in clients_by_name(rounds[1]).items() if "train_loss" in c}
    assert trained_1 == set(TOPICS) - {VICTIM}  # the round went on with the other device
    assert (Path(data["run"]["releases"]) / "round-0001").is_dir()
    rejoined = [n for n in (2, 3) if "train_loss" in clients_by_name(rounds[n]).get(VICTIM, {})]
    assert rejoined, f"{VICTIM} never trained again: {rounds[2]['clients']} {rounds[3]['clients']}"
    # it verified and installed the latest release it was sent (skipping the one it missed), chain-checked
    accepted = AcceptedReleases(fleet.folder / "nodes" / VICTIM / "state" / "accepted.json")
    last = accepted.runs["adapter:killed-device"]
    sent = read_release(Path(data["run"]["releases"]) / f"round-{rejoined[-1] - 1:04d}")
    assert last["round"] == rejoined[-1] - 1
    assert last["digest"] == hashlib.sha256(sent.manifest_bytes).hexdigest()
    assert all("refused_release" not in c for r in rounds.values() for c in r["clients"].values())


@pytest.mark.slow
def test_a_slow_device_is_timed_out_logged_and_the_round_goes_on(fleet, tiny_model_dir):
    overrides = _overrides(
        tiny_model_dir, **{"run-id": "slow-device", "round-timeout": SLOW_ROUND_TIMEOUT, "num-server-rounds": 1}
    )
    with _busy_cache(fleet, VICTIM):  # the victim cannot reply before the round timeout, whatever the CPU
        run = fleet.start_run(overrides)
        _wait("the victim's round-1 task", lambda: bool(_apps(fleet, VICTIM)), RUN_TIMEOUT, fleet)
        _wait("round 1's aggregate", lambda: "round 1: aggregated" in _run_log(fleet), RUN_TIMEOUT, fleet)
        assert _alive(_apps(fleet, VICTIM)), "the slow device's app died instead of being slow"
    data = _finish(fleet, run, overrides)

    rounds = {r["round"]: r for r in data["rounds"]}
    victim = fleet.node_ids[VICTIM]  # it never replied, so the server knows it by node id only
    assert rounds[1]["clients"][str(victim)]["timed_out"] == "train"
    assert {n for n, c in clients_by_name(rounds[1]).items() if "train_loss" in c} == set(TOPICS) - {VICTIM}
    assert f"round 1: node {victim} sent no train reply before the round timeout" in _run_log(fleet)
    assert (Path(data["run"]["releases"]) / "round-0001").is_dir()  # the round's aggregate was signed


@pytest.mark.slow
def test_a_killed_coordinator_resumes_from_the_last_signed_round(fleet, tiny_model_dir):
    overrides = _overrides(tiny_model_dir, **{"run-id": "resumed", "round-timeout": ROUND_TIMEOUT})
    overrides["num-server-rounds"] = 2
    releases = fleet.folder / "store" / "adapter" / "resumed"
    run = fleet.start_run(overrides)
    _wait("round 2 in flight", lambda: "[ROUND 2/" in _run_log(fleet), RUN_TIMEOUT, fleet)
    before = {p.name: (p / "manifest.json").read_bytes() for p in releases.glob("round-*")}
    assert sorted(before) == ["round-0000", "round-0001"]
    fleet.stop("superlink", sig=signal.SIGKILL)  # kill -9 the coordinator: SuperLink, ServerApp, all of it
    fleet.stop(f"run-{run.pid}")
    fleet.start_superlink()  # restarted on the same port and state database; the devices reconnect
    fleet.wait_online()
    data = fleet.run(overrides, timeout=RUN_TIMEOUT)

    names = sorted(p.name for p in releases.iterdir() if p.is_dir())
    assert names == [f"round-{n:04d}" for n in range(3)]  # none lost, none duplicated, no partial folder
    for name, manifest in before.items():
        assert (releases / name / "manifest.json").read_bytes() == manifest  # signed rounds were not redone
    trust = TrustList.load(fleet.signing_key.with_name("server.key.pub"))
    point = resume_point(releases, trust, "resumed", data["run"]["base_digest"], "fedavg")
    assert point is not None and point.round == 2 and len(point.chain) == 3  # the whole chain verifies
    rounds = sorted(r["round"] for r in data["rounds"])
    assert rounds == [0, 1, 2]
    by_round = {r["round"]: r for r in data["rounds"]}
    assert "resumed" in by_round[1]
    assert [by_round[n]["release"]["manifest"] for n in range(3)] == list(point.chain)
    assert all("refused_release" not in c for r in data["rounds"] for c in r["clients"].values())
    store = StateStore(fleet.folder / "outputs" / "state.sqlite", read_only=True)  # the dashboard's record
    signed = store.last_signed_round("resumed")
    assert signed is not None and (signed.round, signed.manifest_digest) == (2, point.chain[2])
    with store.read() as conn:
        view = run_view(conn, "resumed")
    assert view is not None and [r["round"] for r in view["rounds"]] == [0, 1, 2]  # round 2 once, not twice
    assert [r["manifest_digest"] for r in view["rounds"]] == list(point.chain)
    for device in TOPICS:  # every device followed the chain across the restart (it checks round r+1 names r)
        state = AcceptedReleases(fleet.folder / "nodes" / device / "state" / "accepted.json").runs["adapter:resumed"]
        assert (state["round"], state["digest"]) == (1, point.chain[1])  # round 2 started from it
