"""Devices that run only approved app code (``client/app_pin.py``), on a real fleet (TLS SuperLink, SuperNodes).

In a Flower deployment a run's ClientApp travels with it: the SuperLink hands each SuperNode the
FAB that whoever submitted the run built. A device whose node config names a pin file (``app-pins``:
sha256 of the FABs its operator approved) and a trust file (``app-trust``: the fleet's app-signing
key), started by ``fleetlora device`` (the pin's ``flwr-clientapp`` first on its PATH), refuses
another app before any of its code runs, even when the run carries the fleet key's signature of the
fleet's app (that devices run the signed fleet app, six tasks each: ``tests/server/test_fleet_secure.py``).
The other app here is the product's packages plus a ClientApp that reads the device's training file
and leaves a marker, at import and when called; then an AgentApp run, whose process (Flower's own
``flwr-agentapp``) a device refuses to start at all.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from server.fleet import APP_DIR, CONNECTION, LocalFleet, topic_devices
from shared.app_signing import app_hash, build_app, generate_app_key, sign_app
from tests.processes import processes_with_env

DATA = Path(__file__).resolve().parents[2] / "simulations" / "data" / "wordnet"
TOPICS = ["noun.animal", "verb.motion"]
RUN_TIMEOUT = 900  # seconds: the hard bound of each run (a refused one ends in ~10 s here)

HOSTILE = """
import os, pathlib
MARK = pathlib.Path(os.environ["PIN_MARK_DIR"])
(MARK / f"imported-{os.getpid()}").write_text("the other app's code ran at import")
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
app = ClientApp()

@app.train()
def train(msg, context):
    data = pathlib.Path(context.node_config["train-file"]).read_text()[:200]
    (MARK / f"read-{os.getpid()}").write_text(data)
    return Message(RecordDict({"leak": ConfigRecord({"data": data})}), reply_to=msg)
"""


# An AgentApp: any submitter's FAB may declare one; on the SuperLink its main tells every SuperNode to start it
AGENT = """
import json, os, pathlib, time
MARK = pathlib.Path(os.environ["PIN_MARK_DIR"])
(MARK / f"agent-{os.getpid()}").write_text(os.environ.get("FLWR_HOME", ""))
from flwr.agentapp import AgentApp
app = AgentApp()

@app.main()
def main(agent, context):
    (MARK / f"agent-main-{os.getpid()}").write_text(os.environ.get("FLWR_HOME", ""))
    try:
        out = agent.grid.call({"name": "get_nodes", "call_id": "a", "arguments": {}})
        nodes = json.loads(out["output"])["nodes"]
        messages = [{"dst_node_id": n["id"], "payload": "hi"} for n in nodes]
        agent.grid.call({"name": "push_messages", "call_id": "b", "arguments": {"messages": messages}})
        time.sleep(60)
    except Exception:  # on a SuperNode its grid has other tools; what matters is that it ran there
        pass
"""


def _agent_project(dest: Path) -> Path:
    dest.mkdir()
    (dest / "agent.py").write_text(AGENT)
    (dest / "pyproject.toml").write_text(
        '[project]\nname = "other-agent"\nversion = "1.0.0"\ndependencies = []\n\n[tool.flwr.app]\n'
        'publisher = "other"\n\n[tool.flwr.app.components]\nagentapp = "agent:app"\n\n[tool.flwr.app.config]\n'
    )
    return dest


def _start_agent_run(fleet: LocalFleet, app: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Submit an AgentApp run to the fleet's SuperLink through Flower's Control API (as `flwr` would)."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.proto.fab_pb2 import Fab

    monkeypatch.setenv("FLWR_HOME", str(fleet.folder / "cli"))
    fab = build_app(app)
    stub = init_http_client_from_connection(read_superlink_connection(CONNECTION))
    stub.StartRun(StartRunRequest(user_prompt="hello", fab=Fab(hash_str=hashlib.sha256(fab).hexdigest(), content=fab)))


def _hostile_project(dest: Path) -> Path:
    for package in ("client", "server", "shared"):
        shutil.copytree(APP_DIR / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "other").mkdir()
    (dest / "other" / "__init__.py").write_text("")
    (dest / "other" / "app.py").write_text(HOSTILE)
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    pyproject["project"].pop("readme", None)
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "other.app:app"
    pyproject["tool"]["flwr"]["app"]["fab-include"].append("other/**")
    (dest / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return dest


def _overrides(tiny_model_dir: Path, name: str) -> dict[str, object]:
    return {
        "model": str(tiny_model_dir),
        "run-name": name,
        "num-server-rounds": 1,
        "min-clients": 2,
        "aggregation.min-accepted": 1,
        "train.steps": 2,
        "fraction-evaluate": 0.0,
        "aggregation.method": "fedavg",
    }


@pytest.mark.slow
def test_pinned_devices_refuse_another_app_before_any_of_its_code_runs(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "cache"))
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("PIN_MARK_DIR", str(marks))
    hostile = _hostile_project(tmp_path / "hostile")
    assert app_hash(hostile) != app_hash(APP_DIR)
    pins = tmp_path / "app-pins"
    pins.write_text(f"# the fleet's app\n{app_hash(APP_DIR)}\n")
    app_key = generate_app_key(tmp_path / "app.key", "fleet")
    # the fleet key's signature of the fleet's app (replayed under the other FAB), and another key's of this one
    replayed = json.loads(sign_app(build_app(APP_DIR), app_key, "fleet"))
    own = json.loads(sign_app(build_app(hostile), generate_app_key(tmp_path / "other.key", "other"), "other"))
    overrides = _overrides(tiny_model_dir, "other") | {"app-signature": json.dumps(replayed | own)}
    devices = topic_devices(DATA, TOPICS, 2)
    with LocalFleet(tmp_path / "fleet", devices, app_pins=pins, app_key=tmp_path / "app.key") as fleet:
        fleet.app_dir = hostile  # `flwr run` sends the other app; the devices keep their own code and PATH
        run = fleet.start_run(overrides, fleet.folder / "logs" / "other.log")
        try:
            run.wait(timeout=RUN_TIMEOUT)  # a refused app ends the run, it does not hang it
        finally:
            fleet.stop(f"run-{run.pid}")
        # then an AgentApp run (no signature at all): each device must refuse to start Flower's flwr-agentapp
        _start_agent_run(fleet, _agent_project(tmp_path / "agent"), monkeypatch)
        device_logs = [fleet.folder / "logs" / f"device-{name}.log" for name in TOPICS]
        deadline = time.monotonic() + RUN_TIMEOUT
        while not all("refused flwr-agentapp" in p.read_text(errors="replace") for p in device_logs):
            if any("/nodes/" in p.read_text() for p in marks.glob("agent*")):
                break  # it ran on a device: asserted below
            assert time.monotonic() < deadline, "a device never refused the AgentApp run"
            time.sleep(1)
        logs = {p.name: p.read_text(errors="replace") for p in (fleet.folder / "logs").glob("*.log")}
        apps = fleet.folder / "nodes" / TOPICS[0] / "flwr" / "apps"
        installed = sorted(p.name for p in apps.iterdir()) if apps.is_dir() else []
    ran = {p.name: p.read_text() for p in marks.iterdir()}
    # the AgentApp's main runs on the SuperLink (the coordinator's side, FLWR_HOME superlink/); never on a device
    assert any(name.startswith("agent-main") for name in ran), "the AgentApp run never started: nothing was tested"
    on_devices = {name: home for name, home in ran.items() if not name.startswith("agent") or "/nodes/" in home}
    assert not on_devices, f"the other apps' code ran on a device: {on_devices}"
    refusals = [line for name, text in logs.items() if name.startswith("device-") for line in text.splitlines()
                if "is not pinned: not in app-pins, the signature of 'fleet'" in line]  # fmt: skip
    assert refusals, "no device said why it refused the other app"
    assert logs["other.log"].count("sent no update") == 2, logs["other.log"][-3000:]
    assert installed == []  # the other FAB was never installed
    assert not processes_with_env("FLEETLORA_CACHE", str(tmp_path / "cache")), "a fleet process outlived the test"
