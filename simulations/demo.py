"""The main job: a real federated LoRA run of SmolLM2-135M-Instruct over WordNet topics.

Starts a local simulation SuperLink, runs ``flwr run`` on this project (one virtual device
per topic), stops the SuperLink by PID, and prints the round table and where the final
adapter is. Creates the server's signing key (``signing.key``) on first use. Usage::

    python -m simulations.demo [--run-config KEY=VALUE ...] [--output-dir DIR] [--dashboard HOST:PORT|off]

While it runs, the dashboard of the run is served on ``--dashboard`` (default 127.0.0.1:8050);
the address to open, with its token, is printed first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from client.device import (
    DEFAULT_TRUST_FILE,
    ENROLMENT_DIR_ENV,
    ENROLMENT_TRUST_FILE,
    FLOAT_BASE_ENV,
    TRUST_ENV,
    enrolment_files,
)
from server.config_args import parse_overrides
from server.dashboard.cli import Dashboard, read_token, start
from server.report import format_table
from shared.atomic import write_atomic
from shared.config import ConfigError, FleetConfig
from shared.enrolment import enrol_identity
from shared.model import cache_dir
from shared.sign import generate_key, key_id, load_or_generate_key, write_trust_line
from simulations.demo_infer import answer_per_domain
from simulations.flower_local import ROOT, free_port, local_superlink, run_app

# Flower's Ray backend failed to start Ray (a traceback through its ``init_ray``): seen on this 2-core machine as
# "The current node timed out during startup" (raylet) and "Timed out waiting for file .../gcs_server_port_..."
RAY_STARTUP_FAILURE = "in init_ray"
RAY_STARTUP_ATTEMPTS = 3
RAY_RETRY_PAUSE_S = 10


def app_defaults() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml, flattened as Flower flattens it."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return dict(_flatten(cfg))


def _flatten(d: dict[str, Any], prefix: str = "") -> Any:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def run_demo(
    overrides: dict[str, Any], output_dir: Path, flwr_home: Path, num_supernodes: int = 0, parallel: int = 1
) -> dict[str, Any]:
    """Validate the config, run the simulation, return the round log.

    ``num_supernodes``: virtual devices (0: one per topic); device i trains on topic i mod topics.
    ``parallel``: virtual devices that run at once (1: one at a time, on all the machine's cores;
    more: Ray is told of that many CPUs, one per device, as that many machines would run them).
    """
    merged = {**app_defaults(), **overrides}
    merged["data-dir"] = str((ROOT / str(merged["data-dir"])).resolve())
    merged["output-dir"] = str(output_dir.resolve())
    for key in ("signing.key", "signing.trust-file"):
        merged[key] = str((ROOT / Path(str(merged[key])).expanduser()).resolve())
    merged["state.db"] = str(state_db(overrides, output_dir))
    if "base.address" not in overrides:  # the artifact service takes a free loopback port
        merged["base.address"] = f"127.0.0.1:{free_port()}"
    cfg = FleetConfig.from_run_config(merged)  # fails here, before anything starts, on a bad key or value
    num_supernodes = num_supernodes or len(cfg.topics)
    if cfg.min_clients > num_supernodes:
        raise ConfigError(f"min-clients = {cfg.min_clients} but only {num_supernodes} virtual devices")
    if not Path(cfg.signing.key).exists():
        created = generate_key(cfg.signing.key)
        print(f"demo: created signing key {cfg.signing.key} (key id {key_id(created.public_key())})", file=sys.stderr)
    devices = device_env(cfg, num_supernodes)
    rounds_file = Path(cfg.output_dir) / cfg.run_name / "rounds.json"
    rounds_file.unlink(missing_ok=True)
    log_file = Path(cfg.output_dir) / cfg.run_name / "flower.log"
    federation: dict[str, Any] = {"num-supernodes": num_supernodes, "client-resources-num-cpus": 2}
    if parallel > 1:
        federation |= {"client-resources-num-cpus": 1, "init-args-num-cpus": parallel}
    paths = {k: merged[k] for k in ("data-dir", "output-dir", "signing.key", "signing.trust-file", "base.address")}
    paths["state.db"] = merged["state.db"]
    for attempt in range(1, RAY_STARTUP_ATTEMPTS + 1):
        log_start = log_file.stat().st_size if log_file.exists() else 0
        with local_superlink(flwr_home, log_file, devices):
            code = run_app(flwr_home, paths | overrides, federation, log_file)
        with log_file.open("rb") as log:
            log.seek(log_start)
            ray_failed = RAY_STARTUP_FAILURE in log.read().decode(errors="replace")
        if not ray_failed:
            break
        if attempt == RAY_STARTUP_ATTEMPTS:
            raise RuntimeError(f"Ray's local node did not start in {attempt} attempts; see {log_file} and /tmp/ray")
        # Ray's own processes (raylet, GCS server) sometimes do not come up within Ray's fixed startup windows;
        # no device ran: the run starts again from scratch, as a new Flower run (its own run id and releases)
        print(
            f"demo: Ray did not start (attempt {attempt} of {RAY_STARTUP_ATTEMPTS}; its traceback is in {log_file});"
            f" starting the run again in {RAY_RETRY_PAUSE_S} s",
            file=sys.stderr,
        )
        rounds_file.unlink(missing_ok=True)
        time.sleep(RAY_RETRY_PAUSE_S)
    if code != 0 or not rounds_file.is_file():
        raise RuntimeError(f"flwr run failed (exit {code}); see {log_file}")
    data = json.loads(rounds_file.read_text())
    if "finished" not in data["run"]:
        raise RuntimeError(f"the run stopped before its last round; see {log_file} and {rounds_file}")
    return data


def device_env(cfg: FleetConfig, num_supernodes: int) -> dict[str, str]:
    """Return the settings of the demo's virtual devices, chosen by the demo as their operator (``client/device.py``).

    They trust ``signing.trust-file`` (the run config names it for the demo; a device never reads
    it there), through ``FLEETLORA_TRUST_FILE`` for the processes the demo starts and as their
    default trust list in the device cache, so a by-hand ``flwr run`` afterwards finds it too. A
    ``base.format=float`` demo opts its devices in to an unverified base. A secure demo
    (``aggregation.secure``) enrols them (:func:`enrol_devices`).
    """
    trust = Path(cfg.signing.trust_file)
    env = {TRUST_ENV: str(trust)}
    if cfg.aggregation.secure:
        env[ENROLMENT_DIR_ENV] = str(enrol_devices(Path(cfg.signing.key).parent / "enrolment", num_supernodes))
    if trust.is_file():
        default = cache_dir() / DEFAULT_TRUST_FILE
        default.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(default, trust.read_bytes())
        print(f"demo: the virtual devices trust the keys in {trust} (copied to {default})", file=sys.stderr)
    if cfg.base.format == "float":
        env[FLOAT_BASE_ENV] = "1"
    return env


def enrol_devices(folder: Path, num_supernodes: int) -> Path:
    """Enrol the virtual devices for SecAgg+ (``shared/enrolment.py``); return their enrolment folder.

    The demo plays the enrolment authority too (``<folder>/authority.key``; in a fleet, whoever admits
    devices holds it, not the coordinator): virtual device i gets an identity and its enrolment in
    ``<folder>/devices`` as ``partition-<i>.key`` / ``.enrolment``, beside ``trust.pub`` (the
    authority), which it finds through ``FLEETLORA_SECAGG_ENROLMENT_DIR`` (``client/device.py``).
    """
    authority = load_or_generate_key(folder / "authority.key")
    devices = folder / "devices"
    for pid in range(num_supernodes):
        enrol_identity(authority, *enrolment_files(devices, f"partition-{pid}")[:2])
    write_trust_line(devices / ENROLMENT_TRUST_FILE, authority)  # the key that enrolled them, whatever the .pub says
    print(f"demo: enrolled {num_supernodes} virtual devices for SecAgg+ in {devices}", file=sys.stderr)
    return devices


def state_db(overrides: dict[str, Any], output_dir: Path) -> Path:
    """Return the state store: ``state.db`` if given (relative to the project), else ``<output-dir>/state.sqlite``."""
    given = str(overrides.get("state.db") or app_defaults().get("state.db") or "")
    return (ROOT / Path(given).expanduser()).resolve() if given else output_dir.resolve() / "state.sqlite"


def start_dashboard(address: str, db: Path) -> Dashboard | None:
    """Serve the dashboard of ``db`` during the run (``off``: none); a taken port is reported, not fatal."""
    if address == "off":
        return None
    try:
        dashboard = start(db, address, read_token(None))
    except OSError as exc:
        print(f"demo: no dashboard on {address} ({exc}); watch with: fleetlora dashboard --db {db}", file=sys.stderr)
        return None
    print(f"demo: watch the rounds live at {dashboard.url}", file=sys.stderr)
    return dashboard


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run-config", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key"
    )
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs")
    parser.add_argument("--flwr-home", type=Path, default=ROOT / ".flwr")
    parser.add_argument(
        "--dashboard", default="127.0.0.1:8050", metavar="HOST:PORT", help="serve the dashboard there during the run"
    )
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        overrides = parse_overrides(args.run_config)
        dashboard = start_dashboard(args.dashboard, state_db(overrides, args.output_dir))
        try:
            data = run_demo(overrides, args.output_dir, args.flwr_home)
        finally:
            if dashboard is not None:
                dashboard.stop()
    except (ConfigError, RuntimeError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    wall = time.time() - t0
    print("\n" + format_table(data))
    print(f"\nfinal adapter (PEFT folder): {data['run']['adapter']}")
    run_dir = Path(data["run"]["adapter"]).parent
    print(f"round log: {run_dir / 'rounds.json'}")
    print(f"signed releases: {data['run']['releases']} (check one: fleetlora verify <folder> --trust <key>.pub)")
    print(f"browse this run and earlier ones: fleetlora dashboard --db {state_db(overrides, args.output_dir)}")
    print(f"wall time: {wall:.0f} s")
    if data["run"].get("base_format") == "int4":  # the devices' edge runtime, on the run's final signed adapter
        print("\n" + answer_per_domain(data["run"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
