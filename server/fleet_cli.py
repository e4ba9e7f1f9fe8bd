"""``fleetlora fleet up|down``: a local fleet on loopback (``server/fleet.py``), for operators and CI.

``up`` starts the SuperLink (TLS, SuperNode authentication), one SuperNode per device (each on
its own topic partition, with its own identity key, TLS client certificate, cache and state, and a
SecAgg+ identity the fleet's enrolment authority enrolled, and running only apps the fleet's
app-signing key ``<dir>/app-signing.key`` signed: each run signs this checkout's), and the artifact
service (mutual TLS: the fleet's devices only); runs ``flwr run . fleet`` to the end; prints the
round table; and stops every process it started.
``--keep`` leaves the fleet running after the run, for ``flwr`` commands against it
(``FLWR_HOME=<dir>/cli flwr supernode list fleet``); ``down`` then stops it by the PIDs in
``<dir>/fleet.json``.
"""

from __future__ import annotations

import argparse
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict

from server.config_args import parse_overrides
from server.fleet import APP_DIR, LocalFleet, stop_recorded, topic_devices
from server.report import format_table
from shared.config import FleetConfig

DEFAULT_DIR = Path("outputs/fleet")
# A quick demonstration: the pyproject defaults, fewer rounds and steps (each message starts a fresh app process).
FLEET_DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 2,
    "min-clients": 2,
    "train.steps": 3,
    "train.max-seq-len": 64,
    "eval.max-examples": 16,
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``fleet`` subcommand."""
    p = sub.add_parser(
        "fleet", help="run a local fleet on loopback: SuperLink, SuperNodes, artifact service (mutual TLS)"
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start the fleet, run the app to the end, stop every process")
    up.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"fleet folder (default {DEFAULT_DIR})")
    up.add_argument("--nodes", type=int, default=3, help="SuperNodes, one topic partition each (default 3)")
    up.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key")
    up.add_argument("--timeout", type=float, default=3600, help="give up on the run after this many seconds")
    up.add_argument("--keep", action="store_true", help="leave the fleet running after the run (`fleet down` stops it)")
    up.add_argument("--fresh", action="store_true", help="delete the fleet folder first (new certificates, keys)")
    up.set_defaults(func=_up)
    down = verbs.add_parser("down", help="stop the processes of a fleet left running with --keep")
    down.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    down.set_defaults(func=_down)


def _up(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise ValueError("--nodes must be >= 1")
    overrides = {**FLEET_DEFAULTS, **parse_overrides(args.run_config)}
    defaults = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = FleetConfig.from_run_config(flatten_dict(defaults) | overrides)  # a bad key fails before anything starts
    if cfg.min_clients > args.nodes:
        raise ValueError(f"min-clients = {cfg.min_clients} needs at least that many --nodes (got {args.nodes})")
    stop_recorded(args.dir)  # a fleet left running in this folder
    if args.fresh:
        shutil.rmtree(args.dir, ignore_errors=True)
    devices = topic_devices((APP_DIR / cfg.data_dir).resolve(), list(cfg.topics), args.nodes)
    t0 = time.time()
    # the devices run only apps the fleet's app-signing key signed: each run signs this checkout's, as it is now
    fleet = LocalFleet(args.dir, devices, app_key=args.dir.resolve() / "app-signing.key")
    with fleet:
        print(
            f"fleet: SuperLink on {fleet.superlink_address} (TLS, SuperNode auth), {args.nodes} SuperNodes, "
            f"artifact service on {fleet.artifact_address} (mutual TLS); logs in {fleet.folder / 'logs'}",
            flush=True,
        )
        data = fleet.run(overrides, timeout=args.timeout, echo=True)
        if args.keep:
            fleet.procs.clear()  # handed over to `fleet down` (fleet.json keeps their PIDs)
    print("\n" + format_table(data))
    print(
        f"\nfleet: {len(data['rounds']) - 1} rounds in {time.time() - t0:.0f} s (start to stop); "
        f"signed releases in {data['run']['releases']}"
    )
    print("fleet: left running; stop it with `fleetlora fleet down`" if args.keep else "fleet: every process stopped")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = stop_recorded(args.dir)
    print(f"fleet: stopped {', '.join(stopped)}" if stopped else f"fleet: nothing of {args.dir} was running")
    return 0
