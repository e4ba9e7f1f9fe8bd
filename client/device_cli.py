r"""``fleetlora device``: start this device's SuperNode so that it runs only the app its operator approved.

A SuperNode runs whatever ClientApp each run ships unless the app pin's ``flwr-clientapp`` comes
first on its PATH (``client/app_pin.py``). Starting ``flower-supernode`` by hand, one forgotten
PATH entry runs any app; this command cannot forget it: it checks that the node config names
``app-pins`` or ``app-trust`` (and that the file reads), writes the shim, puts it first on PATH and
replaces itself with ``flower-supernode`` and the arguments given after ``--`` (same PID: a service
manager that started this command stops the SuperNode). It refuses ``--isolation process`` (the
SuperNode then starts no ClientApp process of its own, so no pin would check what runs), a
Runtime API ``--host`` off loopback (whoever connects gets the device's tasks) and
``--allow-runtime-dependency-installation`` (dependencies from a package index, unpinned); unless
given its own, it serves the Runtime API over TLS with a certificate for loopback from a CA of the
device's, made anew at every start (``runtime-tls/`` beside the pin's folder, this user's alone)::

    fleetlora device -- --superlink coordinator:8000 --root-certificates ca.pem \
        --auth-supernode-private-key device.key --node-config "app-trust='app-trust.yaml' ..."
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, NoReturn

from click import ClickException

from shared.app_signing import write_pin_shim
from shared.certs import make_fleet_certs

PIN_KEYS = ("app-pins", "app-trust")  # = client/app_pin.py PIN_KEY, TRUST_KEY
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the Runtime API's --host, and its certificate's names
PINNED_ENV = "FLEETLORA_APP_PINNED"  # = client/app_pin.py, client/device.py


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``device`` subcommand."""
    p = sub.add_parser(
        "device",
        help="start this device's SuperNode running only approved apps (the app pin)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--pin-dir",
        type=Path,
        default=None,
        help="this SuperNode's own folder for the pin's flwr-clientapp (default <state-dir>/pin-bin)",
    )
    p.add_argument("supernode_args", nargs=argparse.REMAINDER, help="--, then flower-supernode's own arguments")
    p.set_defaults(func=_device)


def supernode_command(args: list[str], pin_dir: Path | None) -> tuple[list[str], dict[str, str]]:
    """Return the ``flower-supernode`` command and environment that run only approved apps; refuse otherwise.

    The arguments are read by ``flower-supernode``'s own parser (prefixes, repeats and all), so the node
    config checked here is the one the SuperNode uses.
    """
    from flwr.common.config import parse_config_args
    from flwr.common.constant import ISOLATION_MODE_SUBPROCESS
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    if args and args[0] == "--":
        args = args[1:]
    parser = _parse_args_run_supernode()
    parser.prog = "flower-supernode"

    def refuse(message: str) -> NoReturn:
        raise ValueError(f"flower-supernode's arguments: {message}")

    parser.error = refuse  # type: ignore[method-assign]  # a refusal names it; argparse would exit
    parsed = parser.parse_args(args)
    if parsed.isolation != ISOLATION_MODE_SUBPROCESS:
        raise ValueError(
            f"--isolation {parsed.isolation}: the SuperNode would start no flwr-clientapp of its own (an outside "
            "process serves its tasks), so the pin could not check them; run it in subprocess isolation (the default)"
        )
    if parsed.runtime_dependency_install:
        raise ValueError(
            "--allow-runtime-dependency-installation: each task would `uv sync` the app's dependencies from a package "
            "index and import them before the app (the pin approves the FAB's bytes, not what an index serves), and "
            "the lock file it writes into the app's folder makes the pin refuse every later task"
        )
    if parsed.host not in LOOPBACK:
        raise ValueError(
            f"--host {parsed.host}: the SuperNode's Runtime API hands this device's tasks (its node config, each run's "
            "FAB) to any process that connects and takes replies in its name; keep it on loopback (the default)"
        )
    try:
        node_config = parse_config_args([parsed.node_config] if parsed.node_config else None)
    except (ValueError, TypeError, OSError, ClickException) as e:
        raise ValueError(f"--node-config does not parse: {e}") from None
    named = {k: v for k in PIN_KEYS if isinstance(v := node_config.get(k), str) and v}
    if not named:
        raise ValueError(f"the node config names neither {' nor '.join(PIN_KEYS)}: this device would run no app")
    check_approvals(node_config)  # a file that will refuse every app fails here, not at the first round
    state_dir = node_config.get("state-dir")
    folder = pin_dir or (Path(state_dir) / "pin-bin" if isinstance(state_dir, str) and state_dir else None)
    if folder is None:
        raise ValueError("give --pin-dir, or a state-dir (a path string) in the node config: the pin's folder")
    # this interpreter's (its venv's bin: flower-supernode, and the flower-superexec it starts by name), then PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    exe = shutil.which("flower-supernode", path=path)
    if exe is None:
        raise RuntimeError("flower-supernode is not installed here (pip install 'fleetlora[device]')")
    env = {k: v for k, v in os.environ.items() if k != PINNED_ENV}  # only the pin's own process sets it
    env["PATH"] = f"{write_pin_shim(folder.resolve())}{os.pathsep}{path}"
    tls: list[str] = []
    if not (parsed.ssl_certfile or parsed.ssl_keyfile or parsed.ssl_ca_certfile):
        # The Runtime API checks no Host header: in plaintext a web page in a browser on the device could reach it by
        # DNS rebinding and take a task or answer in the device's name; over TLS with a certificate for loopback
        # only, the browser refuses. Only this SuperNode trusts the CA, given by path at its start: made anew at every
        # start (nothing to renew, nothing planted or stale to trust), in a folder of this user's alone.
        certs = make_fleet_certs(_private_folder(folder.resolve().parent / "runtime-tls"), [], LOOPBACK, True)
        tls = ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key)]
        tls += ["--ssl-ca-certfile", str(certs.ca)]
    return [exe, *args, *tls], env


def check_approvals(node_config: dict[str, Any]) -> None:
    """Refuse approvals the pin would refuse every app for: unreadable or malformed files, a bad signing floor."""
    from client.app_pin import SIGNED_AFTER_KEY, AppNotPinnedError, read_pins, read_trusted

    try:
        if isinstance(pins := node_config.get(PIN_KEYS[0]), str) and pins:
            read_pins(pins)
        if isinstance(trust := node_config.get(PIN_KEYS[1]), str) and trust:
            read_trusted(trust)
    except AppNotPinnedError as e:
        raise ValueError(f"node config: {e}") from None
    floor = node_config.get(SIGNED_AFTER_KEY, 0)
    if type(floor) is not int or floor < 0:
        raise ValueError(f"node config {SIGNED_AFTER_KEY} must be Unix seconds (an integer), got {floor!r:.40}")


def _private_folder(path: Path) -> Path:
    """Make ``path`` (mode 0700) or check that it is this user's alone: what it holds decides whom SuperExec trusts."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ValueError(f"{path} must be a folder of this user's that no one else can write to")
    return path


def _device(args: argparse.Namespace) -> int:
    cmd, env = supernode_command(list(args.supernode_args), args.pin_dir)
    os.execve(cmd[0], cmd, env)  # noqa: S606 (the SuperNode replaces this process: same PID)
