"""``fleetlora dashboard``: serve the dashboard of a state store, in the foreground or in a thread.

The token comes from ``--token-file``, else ``$FLEETLORA_DASHBOARD_TOKEN``, else a fresh random
one; the address to open, token included, is printed at start.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from server.dashboard.app import create_app
from server.dashboard.auth import new_token
from server.state import StateStore

DEFAULT_ADDRESS = "127.0.0.1:8050"
DEFAULT_DB = Path("outputs") / "state.sqlite"
TOKEN_ENV = "FLEETLORA_DASHBOARD_TOKEN"


@dataclass
class Dashboard:
    """A dashboard listening on ``port``; :meth:`stop` ends it."""

    url: str
    """The address to open, token included."""
    port: int
    server: uvicorn.Server
    sock: socket.socket
    store: StateStore
    thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` (or Ctrl-C in the main thread)."""
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        """Stop serving and close the store."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.store.close()


def start(db: str | Path, address: str = DEFAULT_ADDRESS, token: str | None = None, thread: bool = True) -> Dashboard:
    """Open ``db`` read-only and serve its dashboard on ``address`` (HOST:PORT, port 0: any free one).

    With ``thread`` it serves in a daemon thread and this returns once it listens; otherwise
    call ``serve_forever()`` on the result.

    Raises
    ------
    OSError
        If the address cannot be bound (e.g. the port is taken).
    """
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(f"dashboard address '{address}' must be HOST:PORT")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), int(port_text)))  # fails here, with the address, if it is taken
    sock.listen(128)  # connections queue from now on, before uvicorn accepts them
    port = int(sock.getsockname()[1])
    token = token or new_token()
    store = StateStore(db, read_only=True)
    config = uvicorn.Config(create_app(store, token), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/?token={token}"
    dashboard = Dashboard(url=url, port=port, server=server, sock=sock, store=store)
    if thread:
        dashboard.thread = threading.Thread(target=dashboard.serve_forever, daemon=True, name="dashboard")
        dashboard.thread.start()
        deadline = time.monotonic() + 30
        while not server.started and dashboard.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            dashboard.stop()
            raise OSError(f"the dashboard did not start on {address}")
    return dashboard


def read_token(token_file: Path | None) -> str | None:
    """Return the token from ``token_file`` (first line), else from ``$FLEETLORA_DASHBOARD_TOKEN``, else None."""
    if token_file is not None:
        lines = token_file.read_text().strip().splitlines()
        if not lines:
            raise ValueError(f"token file {token_file} is empty")
        return lines[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``dashboard`` subcommand."""
    p = sub.add_parser("dashboard", help="serve the read-only web dashboard of the runs in a state store")
    p.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"the state store (default {DEFAULT_DB})")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"HOST:PORT to listen on (default {DEFAULT_ADDRESS})")
    p.add_argument(
        "--token-file", type=Path, help=f"read the token from this file (default: ${TOKEN_ENV}, else a random one)"
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    dashboard = start(args.db, args.address, read_token(args.token_file), thread=False)
    host = args.address.rpartition(":")[0].strip("[]")
    if not _is_loopback(host):
        print(
            f"dashboard: listening on {host}, not loopback: anyone who reaches this port with the token can read "
            "every run, and plain HTTP carries the token in clear; prefer 127.0.0.1 and an SSH tunnel",
            file=sys.stderr,
        )
    print(f"dashboard of {dashboard.store.path} (read-only): open {dashboard.url}  (Ctrl-C stops)", flush=True)
    try:
        dashboard.serve_forever()
    finally:
        dashboard.store.close()
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
