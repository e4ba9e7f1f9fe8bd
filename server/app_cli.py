"""``fleetlora app key|sign|hash``: approve the app a fleet's devices run (``shared/app_signing.py``).

``key`` makes an app-signing key and the trust file devices name as ``app-trust``; ``sign`` prints
the run-config pair that carries a signature over the FAB ``flwr run <app>`` will send
(``flwr run <app> <federation> --run-config "app-signature='...' ..."``), or writes it as a TOML
file (``--out``, for ``--run-config <file>``); ``hash`` prints that FAB's SHA-256, an ``app-pins``
line. The key belongs to whoever approves the app's code (its reviewer), not necessarily to the
coordinator's operator: a device runs an app only with its signature.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from server.config_args import toml_value
from shared.app_signing import (
    APP_DIR,
    SIGNATURE_KEY,
    app_hash,
    build_app,
    generate_app_key,
    load_app_key,
    sign_app,
    trusted_key_id,
)
from shared.atomic import write_atomic

KEY_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``app`` subcommand."""
    p = sub.add_parser("app", help="sign the app devices run (app-signing key, app-trust file, FAB digest)")
    verbs = p.add_subparsers(dest="verb", required=True)
    key = verbs.add_parser("key", help="make an app-signing key (OpenSSH Ed25519, 0600) and <key>.trust.yaml")
    key.add_argument("key", type=Path)
    key.add_argument("--id", default="fleetlora", help="the key's id in the devices' app-trust file")
    key.set_defaults(func=_key)
    sign = verbs.add_parser("sign", help="sign the FAB `flwr run <app>` sends; print its --run-config")
    sign.add_argument("app", type=Path, nargs="?", default=APP_DIR, help=f"the app folder (default {APP_DIR})")
    sign.add_argument("--key", type=Path, required=True, help="the app-signing key")
    sign.add_argument(
        "--id",
        default=None,
        help="the key's id in the devices' app-trust file (default: the one <key>.trust.yaml gives it)",
    )
    sign.add_argument("--out", type=Path, default=None, help="write a TOML file for `flwr run --run-config FILE`")
    sign.set_defaults(func=_sign)
    digest = verbs.add_parser("hash", help="print the SHA-256 of the FAB `flwr run <app>` sends (an app-pins line)")
    digest.add_argument("app", type=Path, nargs="?", default=APP_DIR)
    digest.set_defaults(func=lambda a: print(app_hash(a.app)))


def _key_id(value: str) -> str:
    if not KEY_ID.fullmatch(value):
        raise ValueError(f"--id {value[:70]!r} must be 1-64 of [A-Za-z0-9._@-]")
    return value


def _key(args: argparse.Namespace) -> int:
    for path in (args.key, Path(f"{args.key}.trust.yaml")):
        if path.exists():
            raise ValueError(f"{path} exists; an app-signing key and its trust file are never overwritten")
    generate_app_key(args.key, _key_id(args.id))
    print(f"app-signing key {args.key}; devices trust it with node config app-trust='{args.key}.trust.yaml'")
    return 0


def _sign(args: argparse.Namespace) -> int:
    key = load_app_key(args.key)
    known = trusted_key_id(args.key, key)
    if args.id is None and known is None:
        raise ValueError(f"give --id: no {args.key}.trust.yaml names this key (devices find a signature by its id)")
    if args.id is not None and known is not None and args.id != known:
        raise ValueError(f"--id {args.id!r}: {args.key}.trust.yaml names this key {known!r}, which devices look up")
    fab = build_app(args.app)
    value = sign_app(fab, key, _key_id(str(args.id or known)))
    if args.out is None:
        print(f"{SIGNATURE_KEY}={toml_value(value)}")  # one --run-config pair; it holds no space
    else:
        write_atomic(args.out, f"{SIGNATURE_KEY} = {toml_value(value)}\n".encode())
        print(f"signed the FAB of {args.app} ({len(fab):,} bytes); run it with --run-config {args.out}")
    return 0
