"""Devices that run only approved app code (``client/app_pin.py``), on a real fleet (TLS SuperLink, SuperNodes).

In a Flower deployment a run's ClientApp travels with it: the SuperLink hands each SuperNode the
FAB that whoever submitted the run built. A device whose node config names a pin file (``app-pins``:
sha256 of the FABs its operator approved) and a trust file (``app-trust``: the fleet's app-signing
key), started by ``fleetlora device`` (the pin's ``flwr-clientapp`` first on its PATH), refuses
another app before any of its code runs, even when the run carries the fleet key's signature of the
fleet's app (that devices run the signed fleet app, six tasks each: ``tests/server/test_fleet_secure.py``).
The other app here is the product's packages plus a ClientApp that reads the device's training file
and leaves a marker, at import and when called.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import tomli_w

from server.fleet import APP_DIR, LocalFleet, topic_devices
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
        logs = {p.name: p.read_text(errors="replace") for p in (fleet.folder / "logs").glob("*.log")}
        apps = fleet.folder / "nodes" / TOPICS[0] / "flwr" / "apps"
        installed = sorted(p.name for p in apps.iterdir()) if apps.is_dir() else []
    assert not list(marks.iterdir()), f"the other app's code ran on a device: {sorted(marks.iterdir())}"
    refusals = [line for name, text in logs.items() if name.startswith("device-") for line in text.splitlines()
                if "is not pinned: not in app-pins, the signature of 'fleet'" in line]  # fmt: skip
    assert refusals, "no device said why it refused the other app"
    assert logs["other.log"].count("sent no update") == 2, logs["other.log"][-3000:]
    assert installed == []  # the other FAB was never installed
    assert not processes_with_env("FLEETLORA_CACHE", str(tmp_path / "cache")), "a fleet process outlived the test"
