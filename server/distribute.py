"""The artifact service: the coordinator serves signed releases over gRPC (``proto/artifact.proto``).

It serves release folders (``shared/release.py``) under one root::

    <root>/base/                          the 4-bit base model (manifest.json, manifest.sig, files)
    <root>/adapter/<run-id>/round-0003/   an adapter release; <root>/adapter/<run-id>/LATEST names the newest

An artifact name is its folder relative to the root; a final ``latest`` segment resolves through
the ``LATEST`` file next to it. Only files the signed manifest lists are served, in chunks that
each carry their SHA-256, from any byte offset (resume). The service reads; it never signs.

Start it with ``fleetlora serve-artifacts --root DIR --address HOST:PORT [--tls-cert PEM --tls-key PEM]``
(see the README); with a certificate it speaks TLS only, and devices name the CA in their
node config ``ca-file``.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from shared.manifest import ManifestError, parse
from shared.proto import artifact_pb2, artifact_pb2_grpc
from shared.release import FOLDER_NAME, MANIFEST, SIGNATURE, ReleaseError, latest_name

CHUNK_BYTES = 1 << 20


class ArtifactNotFoundError(LookupError):
    """No such artifact or file; the message names it."""


class ArtifactStore:
    """Read-only view of the release folders under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def resolve(self, artifact: str) -> tuple[str, Path]:
        """Return the artifact's resolved name and folder (``latest`` followed), refusing names outside the root."""
        parts = artifact.split("/")
        if not artifact or not all(FOLDER_NAME.fullmatch(p) for p in parts):
            raise ArtifactNotFoundError(f"'{artifact:.100}' is not an artifact name (segments of [A-Za-z0-9._-])")
        if parts[-1] == "latest":
            try:
                latest = latest_name(self.root.joinpath(*parts[:-1]))
            except (ReleaseError, OSError):
                raise ArtifactNotFoundError(f"'{artifact}': LATEST names an invalid release") from None
            if latest is None:
                raise ArtifactNotFoundError(f"'{artifact}': no LATEST release yet")
            parts[-1] = latest
        folder = self.root.joinpath(*parts)
        if not (folder / MANIFEST).is_file():
            raise ArtifactNotFoundError(f"no artifact '{'/'.join(parts)}'")
        return "/".join(parts), folder

    def manifest(self, artifact: str) -> tuple[str, bytes, bytes, dict[str, int]]:
        """Return (resolved name, manifest bytes, signature, file sizes)."""
        name, folder = self.resolve(artifact)
        data = (folder / MANIFEST).read_bytes()
        try:
            files = parse(data).files
        except ManifestError as exc:
            raise ArtifactNotFoundError(f"artifact '{name}' has a malformed manifest: {exc}") from None
        sizes = {f: (folder / f).stat().st_size for f in files if (folder / f).is_file()}
        return name, data, (folder / SIGNATURE).read_bytes(), sizes

    def path(self, artifact: str, file: str) -> Path:
        """Return the path of a file the artifact's manifest lists."""
        _, folder = self.resolve(artifact)
        if file not in parse((folder / MANIFEST).read_bytes()).files or not (folder / file).is_file():
            raise ArtifactNotFoundError(f"artifact '{artifact}' has no file '{file:.100}'")
        return folder / file


class ArtifactServicer(artifact_pb2_grpc.ArtifactServiceServicer):
    """gRPC front of an :class:`ArtifactStore`."""

    def __init__(self, store: ArtifactStore, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.store, self.chunk_bytes = store, chunk_bytes

    def GetManifest(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        """Return the signed manifest and file sizes of an artifact."""
        try:
            name, data, signature, sizes = self.store.manifest(request.artifact)
        except ArtifactNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return artifact_pb2.ManifestReply(artifact=name, manifest=data, signature=signature, sizes=sizes)

    def Download(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802 (gRPC method name)
        """Stream a file from ``offset`` in chunks, each with its SHA-256."""
        try:
            path = self.store.path(request.artifact, request.file)
        except ArtifactNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        size = path.stat().st_size
        if request.offset > size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end of {request.file}")
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while data := f.read(self.chunk_bytes):
                yield self.chunk(offset, data)
                offset += len(data)

    def chunk(self, offset: int, data: bytes) -> Any:
        """Build one chunk message (a seam where tests inject transport damage)."""
        return artifact_pb2.Chunk(offset=offset, data=data, sha256=hashlib.sha256(data).digest())


def serve(
    root: str | Path,
    address: str = "127.0.0.1:0",
    servicer: ArtifactServicer | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """Start the artifact service on ``address`` (port 0: any free port); return the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    artifact_pb2_grpc.add_ArtifactServiceServicer_to_server(servicer or ArtifactServicer(ArtifactStore(root)), server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port


def server_credentials(cert: str | Path, key: str | Path) -> grpc.ServerCredentials:
    """TLS credentials of the artifact service from a PEM certificate (chain) and its private key."""
    return grpc.ssl_server_credentials([(Path(key).expanduser().read_bytes(), Path(cert).expanduser().read_bytes())])


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve-artifacts`` subcommand."""
    p = sub.add_parser("serve-artifacts", help="serve signed releases (base model, adapters) to devices over gRPC")
    p.add_argument("--root", type=Path, required=True, help="folder of release folders (base/, adapter/<run>/...)")
    p.add_argument("--address", default="127.0.0.1:50061", help="HOST:PORT to listen on (default 127.0.0.1:50061)")
    p.add_argument("--tls-cert", type=Path, help="PEM server certificate: serve over TLS only (needs --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.set_defaults(func=_serve_cli)


def _serve_cli(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    credentials = server_credentials(args.tls_cert, args.tls_key) if args.tls_cert else None
    server, port = serve(args.root, args.address, credentials=credentials)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `fleetlora fleet down` and process managers stop it so
    mode = "TLS" if credentials else "plaintext"
    print(f"serving artifacts from {args.root.resolve()} on port {port} ({mode}); Ctrl-C stops", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop(grace=2).wait()
    return 0
