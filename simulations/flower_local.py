"""Run the Flower app as a local simulation through a SuperLink this process owns.

``flwr run`` against its magic ``:local:`` connection starts a detached SuperLink and leaves
it running. We start ``flower-superlink --simulation`` ourselves instead, point a connection
in ``$FLWR_HOME/config.toml`` at it, and stop it by its PID (and its process group) when the
run ends, however it ends, with every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fleetlora-sim"


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process: project-local home, no telemetry, no runtime installs."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        # SuperNodes spawn flower-superexec by name: the venv's bin must be on PATH
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_superlink(flwr_home: Path, log_file: Path) -> Iterator[str]:
    """Start a simulation SuperLink on loopback, yield its address, stop it by PID.

    Flower 1.41 serves its Control, Runtime and Fleet APIs over one HTTP port.
    """
    port = free_port()
    control = f"127.0.0.1:{port}"
    cmd = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(flwr_home / "superlink-state.db"),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(log_file),
    ]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    (flwr_home / "superlink-state.db").unlink(missing_ok=True)
    with log_file.open("ab") as sink:
        proc = subprocess.Popen(
            cmd, env=flower_env(flwr_home), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_port(control, proc, timeout=60, log_file=log_file)
        write_connection(flwr_home, control)
        yield control
    finally:
        stop_process_tree(proc)


def write_connection(flwr_home: Path, address: str) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one insecure connection to ``address``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )


def run_app(
    flwr_home: Path, run_config: Mapping[str, Any], federation_config: Mapping[str, Any], log_file: Path
) -> int:
    """``flwr run . <connection> --stream`` with overrides; returns its exit code."""
    cmd = [
        "flwr",
        "run",
        str(ROOT),
        CONNECTION,
        "--stream",
        "--run-config",
        " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items()),
        "--federation-config",
        " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items()),
    ]
    with log_file.open("ab") as sink:
        proc = subprocess.Popen(
            cmd, env=flower_env(flwr_home), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # stream to the terminal and keep a copy
            sink.write(line)
            sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()
        return proc.wait()


def toml_value(value: Any) -> str:
    """Format a value as Flower's ``--run-config`` parser (TOML) reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def stop_process_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process and every descendant (some start their own session), SIGKILL what is left after 15 s."""
    try:
        root = psutil.Process(proc.pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)


def _wait_for_port(address: str, proc: subprocess.Popen[bytes], timeout: float, log_file: Path) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
            return
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not listen on {address} within {timeout:.0f} s; see {log_file}")
