"""The artifact service: the coordinator serves signed releases over gRPC (``proto/artifact.proto``).

It serves release folders (``shared/release.py``) under one root::

    <root>/base/                          the 4-bit base model (manifest.json, manifest.sig, files)
    <root>/adapter/<run-id>/round-0003/   an adapter release; <root>/adapter/<run-id>/LATEST names the newest

An artifact name is its folder relative to the root; a final ``latest`` segment resolves through
the ``LATEST`` file next to it. Only files the signed manifest lists are served, in chunks that
each carry their SHA-256, from any byte offset (resume). The service reads; it never signs.

It holds under abuse (issue 15):

- **Mutual TLS.** With a certificate it speaks TLS only and serves only devices presenting a
  client certificate signed by the fleet CA (``fleetlora certs --node``): the adapters were
  trained on private data. Plaintext only on a loopback address (a simulation), unless ``insecure``.
- **No path out of the root.** Every folder, ``LATEST`` and file is resolved (symlinks followed)
  and must stay inside the root; one that leaves it is NOT_FOUND, and logged.
- **Limits** (:class:`ServiceLimits`, each value documented there): ``Download`` streams have
  their own budget, so ``GetManifest`` always finds a thread; a busy service answers
  RESOURCE_EXHAUSTED at once; a reader that takes no chunk for ``progress-timeout`` seconds, or a
  stream older than ``stream-deadline``, is cancelled and its thread freed; keepalive,
  connection-age and message-size limits are gRPC server options (:func:`grpc_options`).

Start it with ``fleetlora serve-artifacts --root DIR --address HOST:PORT [--tls-cert PEM --tls-key PEM
--tls-ca PEM]`` (see the README); devices name the CA and their certificate in their node config
(``client/channel.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from server.artifact_limits import CHUNK_BYTES, BusyError, ServiceLimits, Streams, grpc_options
from shared.files import MAX_PEM_BYTES, FileRefusedError, read_bounded
from shared.manifest import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, ManifestError, parse
from shared.proto import artifact_pb2, artifact_pb2_grpc
from shared.release import FOLDER_NAME, LATEST, MANIFEST, SIGNATURE, ReleaseError, latest_name

log = logging.getLogger(__name__)
MAX_SEGMENTS = 8  # "adapter/<run-id>/round-NNNN" has 3; a deeper name is not an artifact


class ArtifactNotFoundError(LookupError):
    """No such artifact or file; the message names it."""


class ArtifactStore:
    """Read-only view of the release folders under ``root``; nothing outside ``root`` is ever read."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def resolve(self, artifact: str) -> tuple[str, Path]:
        """Return the artifact's resolved name and folder (``latest`` followed), refusing names outside the root."""
        parts = artifact.split("/")
        if not artifact or len(parts) > MAX_SEGMENTS or not all(FOLDER_NAME.fullmatch(p) for p in parts):
            raise ArtifactNotFoundError(f"'{artifact:.100}' is not an artifact name (segments of [A-Za-z0-9._-])")
        if parts[-1] == "latest":
            parts[-1] = self._latest(artifact, parts[:-1])
        name = "/".join(parts)
        folder = self.inside(self.root.joinpath(*parts), f"artifact '{name}'")
        if not stat.S_ISREG(self.inside(folder / MANIFEST, f"artifact '{name}'").stat().st_mode):
            raise ArtifactNotFoundError(f"no artifact '{name}'")
        return name, folder

    def manifest_bytes(self, name: str, folder: Path) -> bytes:
        """Return the manifest of the resolved artifact ``name`` in ``folder`` (not found: over its size bound)."""
        what = f"manifest of '{name}'"
        return _read_small(self.inside(folder / MANIFEST, what), MAX_MANIFEST_BYTES, what)

    def _latest(self, artifact: str, run: list[str]) -> str:
        """Return the release folder the run folder's LATEST names (LATEST itself inside the root, small)."""
        run_folder = self.inside(self.root.joinpath(*run), f"'{artifact}'")
        try:
            self.inside(run_folder / LATEST, f"LATEST of '{artifact}'")
        except ArtifactNotFoundError:
            raise ArtifactNotFoundError(f"'{artifact}': no LATEST release yet") from None
        try:
            latest = latest_name(run_folder)
        except (ReleaseError, OSError):
            raise ArtifactNotFoundError(f"'{artifact}': LATEST names an invalid release") from None
        if latest is None:
            raise ArtifactNotFoundError(f"'{artifact}': no LATEST release yet")
        return latest

    def inside(self, path: Path, what: str) -> Path:
        """Return ``path`` resolved (symlinks followed); NOT_FOUND if it does not exist or leaves the root."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            raise ArtifactNotFoundError(f"no {what}") from None
        if not real.is_relative_to(self.root):
            log.warning(
                "artifact service: refused %s: %s leads out of the store %s (to %s); remove that link from the store",
                what,
                path,
                self.root,
                real,
            )
            raise ArtifactNotFoundError(f"no {what}")
        return real

    def manifest(self, artifact: str) -> tuple[str, bytes, bytes, dict[str, int]]:
        """Return (resolved name, manifest bytes, signature, file sizes)."""
        name, folder = self.resolve(artifact)
        data = self.manifest_bytes(name, folder)
        try:
            files = parse(data).files
        except ManifestError as exc:
            raise ArtifactNotFoundError(f"artifact '{name}' has a malformed manifest: {exc}") from None
        what = f"signature of '{name}'"
        signature = _read_small(self.inside(folder / SIGNATURE, what), MAX_SIGNATURE_BYTES, what)
        sizes = {}
        for f in files:
            try:
                sizes[f] = self._file(name, folder, f).stat().st_size
            except ArtifactNotFoundError:
                continue  # the device's fetch then fails on that file, naming it
        return name, data, signature, sizes

    def path(self, artifact: str, file: str) -> Path:
        """Return the resolved path of a file the artifact's manifest lists."""
        name, folder = self.resolve(artifact)
        try:
            listed = file in parse(self.manifest_bytes(name, folder)).files
        except ManifestError:
            listed = False
        if not listed:
            raise ArtifactNotFoundError(f"artifact '{artifact}' has no file '{file:.100}'")
        return self._file(name, folder, file)

    def _file(self, name: str, folder: Path, file: str) -> Path:
        path = self.inside(folder / file, f"file '{file:.100}' of artifact '{name}'")
        if not stat.S_ISREG(path.stat().st_mode):
            raise ArtifactNotFoundError(f"artifact '{name}' has no file '{file:.100}'")
        return path


def _read_small(path: Path, limit: int, what: str) -> bytes:
    """Read the resolved regular file ``path``, at most ``limit`` bytes (no link followed now: O_NOFOLLOW)."""
    try:
        return read_bounded(path, limit, follow_links=False)
    except FileRefusedError as exc:
        raise ArtifactNotFoundError(f"{what} is not a file of at most {limit:,} bytes") from exc
    except OSError:
        raise ArtifactNotFoundError(f"no {what}") from None


def _device(context: Any) -> str | None:
    """Return the name in the client certificate (mutual TLS), or None over plaintext."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else None


class ArtifactServicer(artifact_pb2_grpc.ArtifactServiceServicer):
    """gRPC front of an :class:`ArtifactStore`, within :class:`ServiceLimits`."""

    def __init__(
        self, store: ArtifactStore, chunk_bytes: int = CHUNK_BYTES, limits: ServiceLimits | None = None
    ) -> None:
        self.store, self.chunk_bytes = store, chunk_bytes
        self.limits = limits or ServiceLimits()
        self.streams = Streams(self.limits)

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
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # no link swapped in since resolving
        except (ArtifactNotFoundError, OSError) as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc) if isinstance(exc, LookupError) else "no such file")
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if request.offset > size:
                context.abort(
                    grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end of {request.file}"
                )
            device = _device(context)
            what = f"download of {request.artifact}/{request.file} by {device or context.peer()}"
            try:
                stream = self.streams.open(context, device, what)
            except BusyError as exc:
                log.info("artifact service: refused a %s: %s", what, exc)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            try:
                f.seek(request.offset)
                offset = request.offset
                while data := f.read(self.chunk_bytes):
                    yield self.chunk(offset, data)
                    stream.last = time.monotonic()  # the reader took the chunk: it makes progress
                    offset += len(data)
            finally:
                self.streams.close(stream)

    def chunk(self, offset: int, data: bytes) -> Any:
        """Build one chunk message (a seam where tests inject transport damage)."""
        return artifact_pb2.Chunk(offset=offset, data=data, sha256=hashlib.sha256(data).digest())


def serve(
    root: str | Path,
    address: str = "127.0.0.1:0",
    servicer: ArtifactServicer | None = None,
    credentials: grpc.ServerCredentials | None = None,
    insecure: bool = False,
) -> tuple[grpc.Server, int]:
    """Start the artifact service on ``address`` (port 0: any free port); return the server and its port.

    Raises
    ------
    ValueError
        Plaintext (no ``credentials``) on an address that is not loopback, without ``insecure``:
        anyone who reaches the port would download every run's adapters.
    """
    if credentials is None and not insecure and not _loopback(address):
        raise ValueError(
            f"the artifact service would serve {address} in plaintext: every run's adapters to anyone who reaches "
            "it; give it a TLS certificate (fleetlora certs), or listen on 127.0.0.1"
        )
    servicer = servicer or ArtifactServicer(ArtifactStore(root))
    limits = servicer.limits
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="artifacts"),
        options=grpc_options(limits, servicer.chunk_bytes),
        maximum_concurrent_rpcs=limits.workers + limits.queued_rpcs,
    )
    artifact_pb2_grpc.add_ArtifactServiceServicer_to_server(servicer, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    """Mutual-TLS credentials: present ``cert`` (PEM chain) and ``key``; admit only clients ``client_ca`` signed.

    ``client_ca`` defaults to ``ca.pem`` beside ``cert``, where ``fleetlora certs`` puts the fleet CA.

    Raises
    ------
    ValueError
        There is no CA to check device certificates with: TLS without client certificates would
        serve every run's adapters to anyone who reaches the port.
    """
    ca = Path(client_ca).expanduser() if client_ca else Path(cert).expanduser().parent / "ca.pem"
    if not ca.is_file():
        raise ValueError(
            f"no fleet CA at {ca} to check device certificates with; name it (--tls-ca, or put ca.pem beside "
            f"{Path(cert).name}): the artifact service serves only devices with a certificate the fleet CA signed"
        )
    paths = (Path(key).expanduser(), Path(cert).expanduser(), ca)
    key_pem, cert_pem, ca_pem = (read_bounded(p, MAX_PEM_BYTES) for p in paths)  # a FIFO is refused, not waited on
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve-artifacts`` subcommand."""
    p = sub.add_parser("serve-artifacts", help="serve signed releases (base model, adapters) to devices over gRPC")
    p.add_argument("--root", type=Path, required=True, help="folder of release folders (base/, adapter/<run>/...)")
    p.add_argument("--address", default="127.0.0.1:50061", help="HOST:PORT to listen on (default 127.0.0.1:50061)")
    p.add_argument("--tls-cert", type=Path, help="PEM server certificate: serve over mutual TLS only (needs --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", type=Path, help="fleet CA: serve only devices it certified (default: ca.pem beside it)")
    p.add_argument("--insecure", action="store_true", help="allow plaintext on an address that is not loopback")
    p.set_defaults(func=_serve_cli)


def _serve_cli(args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_ca and not args.tls_cert):
        raise ValueError("--tls-cert and --tls-key go together (and --tls-ca needs them)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    server, port = serve(args.root, args.address, credentials=credentials, insecure=args.insecure)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `fleetlora fleet down` and process managers stop it so
    mode = "mutual TLS" if credentials else "plaintext"
    print(f"serving artifacts from {args.root.resolve()} on port {port} ({mode}); Ctrl-C stops", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop(grace=2).wait()
    return 0
