"""Run the Flower app as a local simulation through a SuperLink this process owns.

``flwr run`` against its magic ``:local:`` connection starts a detached SuperLink and leaves
it running. We start ``flower-superlink --simulation`` ourselves instead, point a connection
in ``$FLWR_HOME/config.toml`` at it, and stop it by its PID (and its process group) when the
run ends, however it ends, with every process it started.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from server.config_args import toml_value
from server.processes import flower_env, free_port, stop_process_tree, wait_for_port

__all__ = ["flower_env", "free_port", "local_superlink", "run_app", "stop_process_tree", "toml_value"]

ROOT = Path(__file__).resolve().parents[1]
CONNECTION = "fleetlora-sim"


@contextlib.contextmanager
def local_superlink(flwr_home: Path, log_file: Path, device_env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Start a simulation SuperLink on loopback, yield its address, stop it by PID.

    Flower 1.41 serves its Control, Runtime and Fleet APIs over one HTTP port. ``device_env``:
    settings of the virtual devices it runs (``client/device.py``: their trust list, ...), which
    only whoever starts the devices may choose, never a run config.
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
            cmd,
            env=flower_env(flwr_home, dict(device_env or {})),
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(control, proc, timeout=60, log_file=log_file)
        write_connection(flwr_home, control)
        yield control
    finally:
        stop_process_tree(proc)


def write_connection(flwr_home: Path, address: str) -> None:
    """Add (or update) our insecure connection ``fleetlora-sim`` to ``$FLWR_HOME/config.toml``.

    Every other entry is kept, and so is the default connection: a by-hand ``flwr run .`` after
    the demo still uses Flower's own ``local`` SuperLink, not ours (stopped once the demo ends).
    A config an older demo left with ``fleetlora-sim`` as the default gets Flower's default back.
    The file is replaced atomically.
    """
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    flower = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)["superlink"]  # default = "local", local = {":local:"}
    config = tomllib.loads(path.read_text()) if path.is_file() else {"superlink": flower}
    superlink = config.setdefault("superlink", {})
    if superlink.get("default", CONNECTION) == CONNECTION:
        superlink["default"] = flower["default"]
        superlink.setdefault(flower["default"], flower[flower["default"]])
    superlink[CONNECTION] = {"address": address, "insecure": True}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomli_w.dumps(config))
    os.replace(tmp, path)


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
