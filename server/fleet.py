"""A local fleet on loopback: the processes of a real deployment, started and stopped by PID.

:class:`LocalFleet` starts, in one folder (``outputs/fleet`` for ``fleetlora fleet up``)::

    certs/                 fleet CA, server certificate (SANs 127.0.0.1, localhost), per device an identity
                           key and a TLS client certificate (``shared/certs.py``)
    keys/server.key(.pub)  the coordinator's Ed25519 release-signing key and the devices' trust list
    enrolment/authority.key(.pub)
                           the enrolment authority (``shared/enrolment.py``): it admits devices to secure
                           aggregation; its ``.pub`` is every device's enrolment trust list. In a real
                           deployment it is held by whoever admits devices, never on the coordinator
    superlink/             flower-superlink: TLS, SuperNode authentication, state database, Flower home
    cli/                   the operator's Flower home: one connection, "fleet", to the SuperLink (TLS)
    store/                 the artifact store, served by ``fleetlora serve-artifacts`` over mutual TLS
    nodes/<name>/          one SuperNode each: its Flower home, release cache and state, and its SecAgg+
                           identity key with the authority's enrolment of it (``identity.key``, ``.enrolment``);
                           when pinned, ``pin-bin/`` (the pin's ``flwr-clientapp``) and ``runtime-tls/``
    app-signing.key        the fleet's app-signing key (OpenSSH Ed25519; ``shared/app_signing.py``), when pinned;
    app-trust.yaml         its public half, every device's ``app-trust``
    outputs/<run-name>/    round log and final adapter;  logs/  one log file per process
    fleet.json             what runs: every process's PID (``fleetlora fleet down`` reads it)

Each SuperNode is a device: its own data partition (a topic's ``train.jsonl`` / ``heldout.jsonl``,
through the node config keys ``client/partition.py`` reads), cache folder, state folder,
identity key, registered on the SuperLink before it connects, and TLS client certificate, which
its node config names (``ca-file``, ``cert-file``, ``key-file``: ``client/channel.py``) and which
the artifact service requires. Everything speaks TLS with the fleet's CA; only the SuperNodes'
local Runtime API (SuperNode to its own app processes, on loopback inside the device) stays plaintext.
Every device is enrolled (node config ``secagg-identity-key``, ``secagg-enrolment``,
``secagg-enrolment-trust``: ``client/device.secagg_enrolment``), so a run with
``aggregation.secure = true`` runs SecAgg+ against a coordinator that sends other messages than the
protocol's too (signed keys, one survivor story); rounds without secure aggregation do not use them.
With ``app_key`` (``fleetlora fleet up`` sets it: ``app-signing.key``, made if missing) every device
trusts that app-signing key (node config ``app-trust``: ``app-trust.yaml``), each run carries its
signature over the FAB it sends (run config ``app-signature``), and each SuperNode is started by
``fleetlora device`` (the app pin's ``flwr-clientapp`` first on its PATH: ``client/app_pin.py``); with
``app_pins``, a file of FAB digests, the same for the FABs it lists. An app submitted by anyone
without the key, or handed over by a hostile SuperLink, is refused before any of its code runs
(README, threat model).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from server.config_args import config_arg
from server.processes import flower_env, free_port, signal_tree, start, stop_pid, wait_for_port
from server.resume import MAX_ROUND_LOG_BYTES
from shared.app_signing import build_app, generate_app_key, load_app_key, sign_app, write_trust_file
from shared.atomic import write_atomic
from shared.certs import FleetCerts, make_fleet_certs
from shared.cli import python_module
from shared.enrolment import enrol_identity
from shared.files import read_bounded
from shared.sign import generate_key, load_or_generate_key, write_trust_line

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app (pyproject.toml): this checkout
CONNECTION = "fleet"
APP_KEY_ID = "fleet"  # the id of the fleet's app-signing key in the devices' app-trust file
MAX_FLEET_FILE_BYTES = 1 << 20  # fleet.json: a few processes' pids and start times


@dataclass(frozen=True)
class Device:
    """One SuperNode: its name and its private data files."""

    name: str
    train_file: Path
    heldout_file: Path


def topic_devices(data_dir: Path, topics: list[str], count: int) -> list[Device]:
    """``count`` devices, device i on topic ``topics[i % len(topics)]`` of ``data_dir`` (the simulation's split)."""
    devices = []
    for i in range(count):
        topic = topics[i % len(topics)]
        name = topic if count <= len(topics) else f"{topic}-{i}"
        devices.append(Device(name, data_dir / topic / "train.jsonl", data_dir / topic / "heldout.jsonl"))
    return devices


class LocalFleet:
    """A SuperLink, SuperNodes and the artifact service on loopback; a context manager that stops them all.

    ``persistent``: the SuperLink keeps its state (registered devices, runs, messages) in a SQLite
    file, so it can be killed and restarted with the devices still admitted (what a real
    coordinator does). Off (default), it keeps its state in memory: Flower 1.41's SQLite state
    has a 5 s busy timeout that 4.7 MB SmolLM2 deltas pushed by 3 devices at once overran on
    this 2-core machine (``database is locked``, the run stops); a restart then needs ``up()``.
    """

    def __init__(
        self,
        folder: str | Path,
        devices: list[Device],
        app_dir: Path = APP_DIR,
        persistent: bool = False,
        app_pins: Path | None = None,
        app_key: Path | None = None,
    ) -> None:
        self.folder = Path(folder).resolve()
        self.app_pins = app_pins  # set: every device runs the FABs whose sha256 this file lists (client/app_pin.py)
        self.app_key = app_key  # set: every device runs the FABs this key signed; every run is signed with it
        self.app_trust = self.folder / "app-trust.yaml"
        self.persistent = persistent
        self.devices = {d.name: d for d in devices}
        self.app_dir = app_dir
        self.certs = FleetCerts(self.folder / "certs")
        self.signing_key = self.folder / "keys" / "server.key"
        self.authority_key = self.folder / "enrolment" / "authority.key"
        self.link_port = free_port()
        self.artifact_port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[str, int] = {}  # Flower's node id of each device, given at registration

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalFleet:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Make the certificates and keys, start the SuperLink, register and start every device."""
        self.make_keys()
        self.start_superlink()
        self._write_connection()
        for name in self.devices:
            args = ("supernode", "register", str(self.certs.node_pub(name)), CONNECTION, "--name", name)
            out = self._cli(*args, "--format", "json")
            self.node_ids[name] = int(json.loads(out[out.index("{") :])["node-id"])
        self.start_artifacts()
        for name in self.devices:
            self.start_device(name)
        self.wait_online()

    def make_keys(self) -> None:
        """Make what is missing of the fleet's keys; (re)write every device's enrolment by the fleet's authority.

        Missing: the certificates (device certificates too), the signing key, the enrolment authority,
        a device's SecAgg+ identity.
        """
        make_fleet_certs(self.certs.folder, list(self.devices))
        if not self.signing_key.exists():
            generate_key(self.signing_key)
        authority = load_or_generate_key(self.authority_key)
        write_trust_line(f"{self.authority_key}.pub", authority)  # the devices' list names the key that enrols them
        for name in self.devices:
            enrol_identity(authority, *self.identity(name))
        if self.app_key is not None:
            key = load_app_key(self.app_key) if self.app_key.exists() else generate_app_key(self.app_key, APP_KEY_ID)
            write_trust_file(self.app_trust, {APP_KEY_ID: key})

    def identity(self, name: str) -> tuple[Path, Path]:
        """Return device ``name``'s SecAgg+ identity key file and its enrolment file."""
        home = self.folder / "nodes" / name
        return home / "identity.key", home / "identity.enrolment"

    def down(self) -> None:
        """Stop every process this fleet started (devices first, the SuperLink last), by PID."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            self.stop(name)

    def stop(self, name: str, sig: int | None = None) -> None:
        """Stop one process and its descendants (``sig``: send it that signal instead, e.g. SIGKILL)."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if sig is None:
            stop_pid(proc.pid)
        else:
            psutil.wait_procs(signal_tree(proc.pid, sig), timeout=10)
        proc.wait(timeout=30)
        self._save_state()

    # ------------------------------------------------------------------ processes
    def start_superlink(self) -> None:
        """Start the SuperLink (TLS, SuperNode authentication); ``persistent``: its state survives a restart."""
        home = self.folder / "superlink"
        cmd = [
            "flower-superlink",
            *("--ssl-certfile", str(self.certs.server_cert), "--ssl-keyfile", str(self.certs.server_key)),
            *("--ssl-ca-certfile", str(self.certs.ca), "--enable-supernode-auth"),
            *("--host", "127.0.0.1", "--port", str(self.link_port), "--disable-runtime-dependency-installation"),
            *(("--database", str(home / "state.db")) if self.persistent else ()),
        ]
        self._start("superlink", cmd, home / "flwr", self.superlink_address)

    def start_artifacts(self) -> None:
        """Start the artifact service over mutual TLS (the fleet's devices only) on the store the ServerApp fills."""
        (self.folder / "store").mkdir(parents=True, exist_ok=True)
        cmd = [
            *python_module("shared.cli", "serve-artifacts", "--root", str(self.folder / "store")),
            *("--address", self.artifact_address),
            *("--tls-cert", str(self.certs.server_cert), "--tls-key", str(self.certs.server_key)),
            *("--tls-ca", str(self.certs.ca)),
        ]
        self._start("artifacts", cmd, self.folder / "superlink" / "flwr", self.artifact_address)

    def node_config(self, name: str) -> dict[str, str]:
        """Return device ``name``'s node config: its data, cache, state, trust lists, TLS files and enrolment."""
        device, home = self.devices[name], self.folder / "nodes" / name
        identity, enrolment = self.identity(name)
        return {
            "name": name,
            "train-file": str(device.train_file.resolve()),
            "heldout-file": str(device.heldout_file.resolve()),
            "cache-dir": str(home / "cache"),
            "state-dir": str(home / "state"),
            "trust-file": f"{self.signing_key}.pub",
            "ca-file": str(self.certs.ca),
            "cert-file": str(self.certs.node_cert(name)),
            "key-file": str(self.certs.node_tls_key(name)),
            "secagg-identity-key": str(identity),
            "secagg-enrolment": str(enrolment),
            "secagg-enrolment-trust": f"{self.authority_key}.pub",
            **({"app-pins": str(self.app_pins)} if self.app_pins is not None else {}),
            **({"app-trust": str(self.app_trust)} if self.app_key is not None else {}),
        }

    def start_device(self, name: str) -> None:
        """Start (or restart) device ``name``'s SuperNode with its key, data, cache and state.

        With ``app_pins`` or ``app_key``, through ``fleetlora device``, which starts it with the app pin's
        ``flwr-clientapp`` first on its PATH (and refuses a node config that names no approval).
        """
        home, node_config = self.folder / "nodes" / name, self.node_config(name)
        args = [
            *("--superlink", self.superlink_address, "--root-certificates", str(self.certs.ca)),
            *("--auth-supernode-private-key", str(self.certs.node_key(name))),
            *("--port", str(free_port()), "--node-config", config_arg(node_config)),
        ]
        if self.app_pins is not None or self.app_key is not None:
            cmd = python_module("shared.cli", "device", "--pin-dir", str(home / "pin-bin"), "--", *args)
        else:
            cmd = ["flower-supernode", *args]
        self._start(f"device-{name}", cmd, home / "flwr", None)

    def _start(self, name: str, cmd: list[str], home: Path, address: str | None) -> None:
        log_file = self.folder / "logs" / f"{name}.log"
        env = flower_env(home, {"PYTHONPATH": str(self.app_dir)})
        self.procs[name] = start(cmd, env, log_file, cwd=self.app_dir)
        self._save_state()
        if address is not None:
            wait_for_port(address, self.procs[name], timeout=90, log_file=log_file)

    # ------------------------------------------------------------------ runs
    def run_config(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Return the run config of a run on this fleet (store, artifact service, keys, outputs), then ``overrides``."""
        return {
            "output-dir": str(self.folder / "outputs"),
            "run-name": "fleet",
            "base.store": str(self.folder / "store"),
            "base.serve": 0,  # the fleet's artifact service serves the store, and outlives a coordinator restart
            "base.address": self.artifact_address,
            "signing.key": str(self.signing_key),
            "signing.trust-file": f"{self.signing_key}.pub",
            **overrides,
        }

    def _app_signature(self) -> str:
        """Sign the FAB ``flwr run`` will send of ``app_dir`` with the fleet's app-signing key."""
        assert self.app_key is not None
        return sign_app(build_app(self.app_dir), load_app_key(self.app_key), APP_KEY_ID)

    def start_run(self, overrides: Mapping[str, Any], log_file: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``flwr run <app> fleet --stream`` (returns at once); its output goes to ``log_file``."""
        cmd = ["flwr", "run", str(self.app_dir), CONNECTION, "--stream"]
        config = self.run_config(overrides)
        if self.app_key is not None and "app-signature" not in overrides:  # signed here, not by every run_config()
            config["app-signature"] = self._app_signature()
        cmd += ["--run-config", config_arg(config)]
        log_file = log_file or self.folder / "logs" / "run.log"
        env = flower_env(self.folder / "cli")
        proc = start(cmd, env, log_file, cwd=self.app_dir)
        self.procs[f"run-{proc.pid}"] = proc
        return proc

    def run(self, overrides: Mapping[str, Any], timeout: float, echo: bool = False) -> dict[str, Any]:
        """Run the app on the fleet to the end (at most ``timeout`` s); return its round log."""
        log_file = self.folder / "logs" / "run.log"
        offset = log_file.stat().st_size if log_file.exists() else 0
        proc = self.start_run(overrides, log_file)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the run did not finish within {timeout:.0f} s; see {log_file}")
                offset = _echo(log_file, offset) if echo else offset
                time.sleep(0.5)
            _echo(log_file, offset) if echo else None
        finally:
            self.stop(f"run-{proc.pid}")
        return self.round_log(overrides, check=True)

    def round_log(self, overrides: Mapping[str, Any], check: bool = False) -> dict[str, Any]:
        """Return the round log of the run ``overrides`` describe (``check``: refuse an unfinished one)."""
        cfg = self.run_config(overrides)
        path = Path(cfg["output-dir"]) / str(cfg["run-name"]) / "rounds.json"
        if not path.is_file():
            raise RuntimeError(f"the run wrote no round log ({path}); see {self.folder / 'logs'}")
        data: dict[str, Any] = json.loads(read_bounded(path, MAX_ROUND_LOG_BYTES))
        if check and "finished" not in data["run"]:
            raise RuntimeError(f"the run stopped before its last round; see {self.folder / 'logs'} and {path}")
        return data

    def online(self) -> set[str]:
        """Return the devices the SuperLink sees online now (``flwr supernode list``)."""
        out = self._cli("supernode", "list", CONNECTION, "--format", "json")
        data = json.loads(out[out.index("{") :])
        online = {int(n["node-id"]) for n in data.get("nodes", []) if n.get("status") == "online"}
        return {name for name, node in self.node_ids.items() if node in online}

    def wait_online(self, timeout: float = 120) -> None:
        """Wait until every running device is online on the SuperLink (after a start or a SuperLink restart)."""
        deadline = time.monotonic() + timeout
        while (missing := {n for n in self.devices if f"device-{n}" in self.procs} - self.online()) != set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"devices {sorted(missing)} not online after {timeout:.0f} s; see {self.folder}")
            time.sleep(1)

    # ------------------------------------------------------------------ helpers
    @property
    def superlink_address(self) -> str:
        """The SuperLink's one port: Fleet, Control and Runtime APIs over HTTPS."""
        return f"127.0.0.1:{self.link_port}"

    @property
    def artifact_address(self) -> str:
        """The artifact service (gRPC over mutual TLS)."""
        return f"127.0.0.1:{self.artifact_port}"

    def _write_connection(self) -> None:
        """Write the operator's Flower connection to the SuperLink, checked with the fleet's CA."""
        home = self.folder / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.superlink_address}"\nroot-certificates = "{self.certs.ca}"\n'
        )

    def _cli(self, *args: str) -> str:
        """Run a ``flwr`` command against the fleet; raise with its output if it fails."""
        env = flower_env(self.folder / "cli", {"COLUMNS": "200"})
        proc = subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout

    def _save_state(self) -> None:
        """Write ``fleet.json``: every living process's PID and start time (``fleetlora fleet down`` reads it)."""
        procs = {}
        for name, proc in self.procs.items():
            try:
                procs[name] = {"pid": proc.pid, "started": psutil.Process(proc.pid).create_time()}
            except psutil.NoSuchProcess:
                continue
        state = {"superlink": self.superlink_address, "artifacts": self.artifact_address, "processes": procs}
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / "fleet.json", json.dumps(state, indent=1).encode())  # `fleet down` relies on it


def stop_recorded(folder: str | Path) -> list[str]:
    """Stop the processes a fleet's ``fleet.json`` records (those still alive with the same start time)."""
    path = Path(folder) / "fleet.json"
    if not path.is_file():
        return []
    stopped = []
    for name, (pid, started) in _recorded(path).items():
        try:
            alive = abs(psutil.Process(pid).create_time() - started) < 1e-3
        except psutil.NoSuchProcess:
            alive = False
        if alive:  # the same process, not a later one that reuses the PID
            stop_pid(pid)
            stopped.append(name)
    path.unlink()
    return stopped


def _recorded(path: Path) -> dict[str, tuple[int, float]]:
    """Parse ``fleet.json``'s processes: name -> (PID, start time); refuse, naming the file and entry, anything else.

    Nothing is stopped on a record that does not parse: a wrong PID would signal someone else's process.
    """
    hint = f"stop its processes by hand (see {path.parent / 'logs'}), then remove {path}"
    try:
        data = json.loads(read_bounded(path, MAX_FLEET_FILE_BYTES))
        processes = data["processes"] if isinstance(data, dict) else None
    except (OSError, ValueError, KeyError, RecursionError) as exc:
        raise ValueError(f"{path} is not a fleet record ({exc}); {hint}") from None
    if not isinstance(processes, dict):
        raise ValueError(f"{path}: 'processes' is not a mapping; {hint}")
    out = {}
    for name, rec in processes.items():
        pid, started = (rec.get("pid"), rec.get("started")) if isinstance(rec, dict) else (None, None)
        if type(pid) is not int or not 1 < pid < 1 << 22 or type(started) is not float or not math.isfinite(started):
            raise ValueError(f"{path}: process {name!r:.40} has no PID and start time ({rec!r:.80}); {hint}")
        out[name] = (pid, started)
    return out


def _echo(log_file: Path, offset: int) -> int:
    """Print what was appended to ``log_file`` since ``offset``; return the new offset."""
    with log_file.open("rb") as f:
        f.seek(offset)
        data = f.read()
    sys.stdout.write(data.decode(errors="replace"))
    sys.stdout.flush()
    return offset + len(data)
