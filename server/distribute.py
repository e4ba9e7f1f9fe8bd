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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shared.manifest import MAX_MANIFEST_BYTES, ManifestError, parse
from shared.proto import artifact_pb2, artifact_pb2_grpc
from shared.release import FOLDER_NAME, LATEST, MANIFEST, SIGNATURE, ReleaseError, latest_name

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20
MAX_SEGMENTS = 8  # "adapter/<run-id>/round-NNNN" has 3; a deeper name is not an artifact
MAX_SIGNATURE_BYTES = 1024  # an Ed25519 signature is 64 bytes
MAX_LATEST_BYTES = 256  # LATEST holds one folder name


@dataclass(frozen=True)
class ServiceLimits:
    """How much of the service one client, or a crowd, can hold; every value bounds an abuse of issue 15."""

    download_streams: int = 8
    """Concurrent ``Download`` streams in all. Each holds a handler thread while its reader reads;
    one more is refused with RESOURCE_EXHAUSTED at once, a status to retry with backoff."""
    streams_per_device: int = 2
    """Concurrent ``Download`` streams of one device (its client certificate's name, over mutual
    TLS): one device cannot take the whole budget. A fetcher downloads one file at a time."""
    spare_workers: int = 4
    """Handler threads beyond ``download_streams``: kept for ``GetManifest`` and for refusing a
    ``Download`` fast, so slow readers never starve a device asking for the manifest."""
    queued_rpcs: int = 32
    """RPCs that may wait for a free thread; beyond that gRPC answers RESOURCE_EXHAUSTED at once
    (``maximum_concurrent_rpcs`` = threads + this) rather than queueing without bound."""
    progress_timeout: float = 60.0
    """Seconds a ``Download`` may wait for its reader to take the next chunk (1 MiB): slower than
    ~17 KiB/s, or not reading at all, and the stream is cancelled (a fetcher can resume from its offset)."""
    stream_deadline: float = 1800.0
    """Seconds one ``Download`` stream may last however fast it reads (a 1 GB file at 1 MB/s takes
    1000 s); a reader trickling just above the progress rate is cut off here."""

    def __post_init__(self) -> None:
        for name in ("download_streams", "streams_per_device", "spare_workers", "progress_timeout", "stream_deadline"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServiceLimits.{name} must be > 0, got {getattr(self, name)!r}")
        if self.queued_rpcs < 0:
            raise ValueError(f"ServiceLimits.queued_rpcs must be >= 0, got {self.queued_rpcs!r}")

    @property
    def workers(self) -> int:
        """Handler threads: the Download budget plus the spare ones."""
        return self.download_streams + self.spare_workers


def grpc_options(limits: ServiceLimits, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[str, int]]:
    """Return the service's gRPC server options: message sizes, HTTP/2 streams, keepalive, connection age."""
    return [
        ("grpc.max_receive_message_length", 16 * 1024),  # a request is an artifact name, a file name, an offset
        ("grpc.max_send_message_length", max(chunk_bytes, MAX_MANIFEST_BYTES) + 64 * 1024),  # a chunk or a manifest
        ("grpc.max_metadata_size", 16 * 1024),  # headers: gRPC's own plus a little; no client needs more
        ("grpc.max_concurrent_streams", 16),  # HTTP/2 streams per connection: one socket cannot open thousands
        ("grpc.keepalive_time_ms", 60_000),  # ping a connection after 60 s without traffic...
        ("grpc.keepalive_timeout_ms", 20_000),  # ...and close it if unanswered in 20 s: a vanished device's streams end
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # a client may ping at most every 10 s...
        ("grpc.http2.max_ping_strikes", 2),  # ...and is disconnected after 2 pings more often than that (ping flood)
        ("grpc.max_connection_idle_ms", 300_000),  # a connection without an RPC for 5 min is closed
        ("grpc.max_connection_age_ms", 3_600_000),  # every connection is closed after 1 h (GOAWAY)...
        ("grpc.max_connection_age_grace_ms", int(limits.stream_deadline * 1000)),  # ...its streams may still end
        ("grpc.so_reuseport", 0),  # no second process may bind our port and take a share of the devices
    ]


class ArtifactNotFoundError(LookupError):
    """No such artifact or file; the message names it."""


class BusyError(RuntimeError):
    """No Download slot is free (in all, or for this device); the message says which."""


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
        """Return the manifest of the resolved artifact ``name`` in ``folder`` (at most one byte over the limit)."""
        return _read_small(self.inside(folder / MANIFEST, f"artifact '{name}'"), MAX_MANIFEST_BYTES)

    def _latest(self, artifact: str, run: list[str]) -> str:
        """Return the release folder the run folder's LATEST names (LATEST itself inside the root, small)."""
        run_folder = self.inside(self.root.joinpath(*run), f"'{artifact}'")
        try:
            pointer = self.inside(run_folder / LATEST, f"LATEST of '{artifact}'")
        except ArtifactNotFoundError:
            raise ArtifactNotFoundError(f"'{artifact}': no LATEST release yet") from None
        info = pointer.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_LATEST_BYTES:
            raise ArtifactNotFoundError(f"'{artifact}': LATEST names an invalid release")
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
        signature = _read_small(self.inside(folder / SIGNATURE, f"signature of '{name}'"), MAX_SIGNATURE_BYTES)
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


def _read_small(path: Path, limit: int) -> bytes:
    """Read at most ``limit`` bytes of a resolved regular file (no link followed now: O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise ArtifactNotFoundError(f"no {path.name} in '{path.parent.name}'") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ArtifactNotFoundError(f"{path.name} in '{path.parent.name}' is not a file")
        return f.read(limit + 1)  # one byte more: the manifest parser refuses an oversized one by its size


@dataclass
class _Stream:
    """One running ``Download``: when it started, when its reader last took a chunk."""

    context: Any
    device: str | None
    what: str
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    released: bool = False
    cut: bool = False


class _Streams:
    """The Download budget (in all, per device) and the watchdog that cancels stalled or overlong streams.

    The watchdog is one thread that lives while streams run (it ends when the last one does), so
    a stopped service leaves no thread behind. Cancelling a stream fails its blocked send, which
    frees the handler thread: the only way to free it, as gRPC's sync server blocks the thread
    while the reader's flow-control window is full.
    """

    def __init__(self, limits: ServiceLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._running: dict[int, _Stream] = {}
        self._by_device: dict[str, int] = {}
        self._watchdog: threading.Thread | None = None

    def open(self, context: Any, device: str | None, what: str) -> _Stream:
        """Take a slot for a stream of ``device`` (None: plaintext, no name); :class:`BusyError` if there is none."""
        with self._lock:
            if len(self._running) >= self.limits.download_streams:
                raise BusyError(f"the service is busy ({self.limits.download_streams} downloads running); retry later")
            if device is not None and self._by_device.get(device, 0) >= self.limits.streams_per_device:
                raise BusyError(f"device '{device:.64}' already runs {self.limits.streams_per_device} downloads")
            stream = _Stream(context, device, what)
            self._running[id(stream)] = stream
            if device is not None:
                self._by_device[device] = self._by_device.get(device, 0) + 1
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="artifact-watchdog", daemon=True)
                self._watchdog.start()
        context.add_callback(lambda: self.close(stream))  # however the RPC ends: done, cancelled, cut off
        return stream

    def close(self, stream: _Stream) -> None:
        """Give the stream's slot back (idempotent: the generator's end and the RPC's end both call it)."""
        with self._lock:
            if stream.released:
                return
            stream.released = True
            self._running.pop(id(stream), None)
            if stream.device is not None:
                self._by_device[stream.device] -= 1
                if not self._by_device[stream.device]:
                    del self._by_device[stream.device]

    def _watch(self) -> None:
        interval = min(self.limits.progress_timeout, self.limits.stream_deadline) / 4
        while True:
            time.sleep(interval)
            now = time.monotonic()
            with self._lock:
                if not self._running:
                    self._watchdog = None
                    return
                late = [
                    s
                    for s in self._running.values()
                    if not s.cut
                    and (now - s.last > self.limits.progress_timeout or now - s.started > self.limits.stream_deadline)
                ]
            for s in late:
                s.cut = True  # once: its slot comes back when the RPC ends (add_callback in open)
                stalled = now - s.last > self.limits.progress_timeout
                log.warning(
                    "artifact service: cut off %s after %.0f s: %s",
                    s.what,
                    now - s.started,
                    f"its reader took no chunk for {now - s.last:.0f} s (limit {self.limits.progress_timeout:.0f} s)"
                    if stalled
                    else f"the stream outlived its deadline of {self.limits.stream_deadline:.0f} s",
                )
                s.context.cancel()  # fails the blocked send: the handler thread returns, the slot is given back


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
        self.streams = _Streams(self.limits)

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
    pair = (Path(key).expanduser().read_bytes(), Path(cert).expanduser().read_bytes())
    return grpc.ssl_server_credentials([pair], root_certificates=ca.read_bytes(), require_client_auth=True)


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
