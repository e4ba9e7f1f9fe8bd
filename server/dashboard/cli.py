"""``fleetlora dashboard``: serve the dashboard of a state store, in the foreground or in a thread.

The token comes from ``--token-file``, else ``$FLEETLORA_DASHBOARD_TOKEN``, else a fresh random
one; the address to open, token included, is printed at start. With ``--tls-cert`` and
``--tls-key`` (e.g. ``server.pem`` / ``server.key`` of ``fleetlora certs``) it serves HTTPS and
its login cookie is ``Secure``. The store is opened read-only (``reader.py``): the dashboard never
creates or migrates it, except once on request with ``--migrate``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from server.dashboard.app import create_app
from server.dashboard.auth import new_token
from server.dashboard.reader import StoreReader
from server.state import StateStore, StateStoreError
from shared.files import MAX_PEM_BYTES, FileRefusedError, read_bounded

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
    reader: StoreReader
    thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop` (or Ctrl-C in the main thread)."""
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        """Stop serving and close the store."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.reader.close()


def start(
    db: str | Path,
    address: str = DEFAULT_ADDRESS,
    token: str | None = None,
    thread: bool = True,
    tls: tuple[Path, Path] | None = None,
) -> Dashboard:
    """Serve the dashboard of the store ``db`` (read-only) on ``address`` (HOST:PORT, port 0: any free one).

    The store need not be readable yet (see ``reader.py``). With ``tls`` (certificate, key; PEM)
    it serves HTTPS. With ``thread`` it serves in a daemon thread and this returns once it
    listens; otherwise call ``serve_forever()`` on the result.

    Raises
    ------
    OSError
        If the address cannot be bound (e.g. the port is taken).
    ValueError
        If the address is not HOST:PORT, the token too short, or the TLS pair unusable.
    """
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(f"dashboard address '{address}' must be HOST:PORT")
    token = token or new_token()
    reader = StoreReader(db)
    app = create_app(reader, token, secure=tls is not None)  # refuses a short token before binding
    cert, key = (None, None) if tls is None else _checked_tls(*tls)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), int(port_text)))  # fails here, with the address, if it is taken
    sock.listen(128)  # connections queue from now on, before uvicorn accepts them
    port = int(sock.getsockname()[1])
    # proxy_headers off: no proxy is in front, so no client may rewrite its address or scheme
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        proxy_headers=False,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )
    server = uvicorn.Server(config)
    scheme = "http" if tls is None else "https"
    url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}/?token={token}"
    dashboard = Dashboard(url=url, port=port, server=server, sock=sock, reader=reader)
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


def _checked_tls(cert: Path, key: Path) -> tuple[str, str]:
    """Return ``cert`` and ``key`` once they load as a TLS server pair (an error now, not a dead server thread)."""
    try:
        for path in (cert, key):  # OpenSSL would wait on a FIFO in a file's place, and read any size
            read_bounded(path, MAX_PEM_BYTES)
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot serve TLS with certificate {cert} and key {key}: {exc}") from None
    return str(cert), str(key)


def read_token(token_file: Path | None) -> str | None:
    """Return the token from ``token_file`` (first line), else from ``$FLEETLORA_DASHBOARD_TOKEN``, else None."""
    if token_file is not None:
        try:
            text = read_bounded(token_file, MAX_PEM_BYTES).decode("utf-8")
        except (FileRefusedError, UnicodeDecodeError) as exc:
            raise ValueError(f"token file {token_file}: {exc}") from None
        lines = text.strip().splitlines()
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
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM; with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    p.add_argument(
        "--migrate",
        action="store_true",
        help="first upgrade the store to this fleetlora's schema (the one write the dashboard can make)",
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = None if args.tls_cert is None else (args.tls_cert, args.tls_key)
    if args.migrate:
        _migrate(args.db)
    dashboard = start(args.db, args.address, read_token(args.token_file), thread=False, tls=tls)
    host = args.address.rpartition(":")[0].strip("[]")
    if not _is_loopback(host):
        clear = "" if tls else ", and plain HTTP carries the token in clear (serve TLS: --tls-cert/--tls-key)"
        print(
            f"dashboard: listening on {host}, not loopback: anyone who reaches this port with the token can read "
            f"every run{clear}; prefer 127.0.0.1 and an SSH tunnel",
            file=sys.stderr,
        )
    problem = dashboard.reader.problem()
    if problem is not None:
        print(f"dashboard: {problem}; its pages say so until the store can be read", file=sys.stderr)
    print(f"dashboard of {dashboard.reader.path} (read-only): open {dashboard.url}  (Ctrl-C stops)", flush=True)
    try:
        dashboard.serve_forever()
    finally:
        dashboard.reader.close()
    return 0


def _migrate(db: Path) -> None:
    """Upgrade an existing store to this fleetlora's schema (never creates one: a typo stays an error)."""
    if not db.is_file():
        raise StateStoreError(f"--migrate: no state store at {db}")
    StateStore(db).close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
