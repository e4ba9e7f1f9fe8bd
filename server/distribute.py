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
- **No path out of the root** (``server/artifact_store.py``): every folder, ``LATEST`` and file is
  resolved (symlinks followed) and must stay inside the root; one that leaves it is NOT_FOUND, and logged.
- **Limits** (:class:`ServiceLimits`, each value documented there): an asyncio server
  (``grpc.aio``), so a waiting call holds no thread; each device's open calls are counted from
  their headers on, and a call's request must arrive within ``request_timeout``; ``Download``
  streams have a budget in all and per device; a busy service answers RESOURCE_EXHAUSTED at
  once; a reader that takes no chunk for ``progress_timeout`` seconds, or a stream older than
  ``stream_deadline``, is cut off and its Download slot freed; keepalive, connection-age and
  message-size limits are gRPC server options (:func:`grpc_options`).

Start it with ``fleetlora serve-artifacts --root DIR --address HOST:PORT [--tls-cert PEM --tls-key PEM
--tls-ca PEM]`` (see the README); devices name the CA and their certificate in their node config
(``client/channel.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.artifact_limits import CHUNK_BYTES, Budget, BusyError, ServiceLimits, grpc_options
from server.artifact_store import ArtifactNotFoundError, ArtifactStore
from shared.files import MAX_PEM_BYTES, read_bounded
from shared.proto import artifact_pb2

log = logging.getLogger(__name__)


def device_of(context: Any) -> str | None:
    """Return who is calling, for the per-device bounds: the name in its client certificate (mutual TLS).

    Over plaintext (``--insecure``), ``ip:<address>`` of a peer that is not on loopback (every
    connection from one address counts as one device); None on loopback, where a simulation's
    devices all come from 127.0.0.1 and have no name to be counted by.
    """
    names = context.auth_context().get("x509_common_name") or []
    if names:
        return names[0].decode(errors="replace")
    kind, _, rest = str(context.peer()).partition(":")  # "ipv4:10.0.0.7:50123", "ipv6:[2001:db8::1]:50123"
    host = rest.rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a unix socket or something else without an address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # "::ffff:127.0.0.1" is loopback too
    return None if kind not in ("ipv4", "ipv6") or address.is_loopback else f"ip:{address}"


SERVICE = artifact_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name


class ArtifactServicer:
    """gRPC front of an :class:`ArtifactStore`, within :class:`ServiceLimits` (on ``grpc.aio``).

    Both methods are registered as taking a request *stream* (on the wire the same as a unary
    request: one message), so the service holds a call from its headers on: it counts the call
    against its device, gives its request ``request_timeout`` to arrive and parses it itself (a
    malformed one is INVALID_ARGUMENT). ``GetManifest`` and ``Download`` take the parsed request;
    tests override them.
    """

    def __init__(
        self, store: ArtifactStore, chunk_bytes: int = CHUNK_BYTES, limits: ServiceLimits | None = None
    ) -> None:
        self.store, self.chunk_bytes = store, chunk_bytes
        self.limits = limits or ServiceLimits()
        self.calls = Budget("calls", self.limits.calls_per_device, self.limits.open_calls)
        self.downloads = Budget("downloads", self.limits.streams_per_device, self.limits.download_streams)

    def handler(self) -> grpc.GenericRpcHandler:
        """Return the service's methods for a gRPC server (in place of the generated ``add_...Servicer_to_server``)."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetManifest": grpc.stream_unary_rpc_method_handler(
                    self._get_manifest, response_serializer=artifact_pb2.ManifestReply.SerializeToString
                ),
                "Download": grpc.stream_stream_rpc_method_handler(
                    self._download, response_serializer=artifact_pb2.Chunk.SerializeToString
                ),
            },
        )

    async def _get_manifest(self, requests: AsyncIterator[bytes], context: Any) -> Any:
        await self._call(context)
        request = await self._request(requests, context, artifact_pb2.ManifestRequest)
        return await self.GetManifest(request, context)

    async def _download(self, requests: AsyncIterator[bytes], context: Any) -> None:
        device = await self._call(context)
        request = await self._request(requests, context, artifact_pb2.DownloadRequest)
        started, cut = time.monotonic(), None
        async with contextlib.aclosing(self.Download(request, context)) as chunks:
            async for chunk in chunks:
                if cut := await self._send(context, chunk, started):
                    break
        if cut:  # the Download slot and the file are given back (the generator is closed); the call is ended
            what = f"download of {request.artifact:.200}/{request.file:.100} by {device or context.peer()}"
            log.warning("artifact service: cut off %s after %.0f s: %s", what, time.monotonic() - started, cut)
            await context.abort(grpc.StatusCode.CANCELLED, f"cut off: {cut}")

    async def _call(self, context: Any) -> str | None:
        """Take a call slot of the caller's device until the call has ended; return the device.

        Until the call has *ended*, not until this handler returns: gRPC sends a reply, or a cut-off
        stream's status, only once the reader takes what is queued before it, so a client that reads
        nothing (an HTTP/2 window of 0) keeps the call open after its handler is done, and that call
        counts here, against its device, until then.
        """
        device = await _take(self.calls, context, "call")
        context.add_done_callback(lambda _: self.calls.give(device))
        return device

    async def _send(self, context: Any, chunk: Any, started: float) -> str | None:
        """Write one chunk; return why the stream is cut off if its reader did not take it in time (None: it did)."""
        limits = self.limits
        wait = min(limits.progress_timeout, started + limits.stream_deadline - time.monotonic())
        try:
            if wait > 0:
                await asyncio.wait_for(context.write(chunk), wait)  # done once the reader's window took it
                return None
        except TimeoutError:
            pass
        if wait < limits.progress_timeout:
            return f"the stream outlived its deadline of {limits.stream_deadline:.0f} s"
        return f"its reader took no chunk for {wait:.0f} s (limit {limits.progress_timeout:.0f} s)"

    async def _request(self, requests: AsyncIterator[bytes], context: Any, message: Any) -> Any:
        """Return the call's one request, parsed; end the call if it sends none in time, or a malformed one."""
        timeout = self.limits.request_timeout
        try:
            raw = await asyncio.wait_for(anext(requests), timeout)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no request within {timeout:.0f} s")
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
        try:
            return message.FromString(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a {message.DESCRIPTOR.name}")

    async def GetManifest(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        """Return the signed manifest and file sizes of an artifact."""
        try:
            name, data, signature, sizes = await asyncio.to_thread(self.store.manifest, request.artifact)
        except ArtifactNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except OSError as exc:  # a file removed or unreadable while it is read: its path is told the log only
            log.warning("artifact service: manifest of '%.200s' unreadable: %s", request.artifact, exc)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"artifact '{request.artifact:.100}' cannot be read now")
        return artifact_pb2.ManifestReply(artifact=name, manifest=data, signature=signature, sizes=sizes)

    async def Download(self, request: Any, context: Any) -> AsyncGenerator[Any, None]:  # noqa: N802 (gRPC method name)
        """Yield a file's chunks from ``offset``, each with its SHA-256, while holding a Download slot."""
        try:
            path = await asyncio.to_thread(self.store.path, request.artifact, request.file)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # no link swapped in since resolving
        except (ArtifactNotFoundError, OSError) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc) if isinstance(exc, LookupError) else "no such file")
        try:
            if request.offset > os.fstat(fd).st_size:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end of {request.file:.100}"
                )
            device = await _take(self.downloads, context, f"download of {request.file:.100}")
            try:
                offset = request.offset
                while data := await asyncio.to_thread(os.pread, fd, self.chunk_bytes, offset):  # off the event loop
                    yield self.chunk(offset, data)
                    offset += len(data)
            except OSError as exc:  # a read error: the device retries (UNAVAILABLE); the path is told the log only
                log.warning("artifact service: reading %.100s at %d failed: %s", request.file, offset, exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{request.file:.100} unreadable at {offset}; retry")
            finally:
                self.downloads.give(device)
        finally:
            os.close(fd)

    def chunk(self, offset: int, data: bytes) -> Any:
        """Build one chunk message (a seam where tests inject transport damage)."""
        return artifact_pb2.Chunk(offset=offset, data=data, sha256=hashlib.sha256(data).digest())


async def _take(budget: Budget, context: Any, what: str) -> str | None:
    """Take a slot of ``budget`` for the caller's device and return the device; RESOURCE_EXHAUSTED if none is free."""
    device = device_of(context)
    try:
        budget.take(device)
    except BusyError as exc:
        log.info("artifact service: refused a %s of %s: %s", what, device or context.peer(), exc)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    return device


class ArtifactServer:
    """A running artifact service: a ``grpc.aio`` server on an event loop of its own thread."""

    def __init__(self, servicer: ArtifactServicer, credentials: grpc.ServerCredentials | None, address: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="artifact-service", daemon=True)
        self._thread.start()
        try:
            self._server, self.port = asyncio.run_coroutine_threadsafe(
                self._start(servicer, credentials, address), self._loop
            ).result()
        except BaseException:
            self._end()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        reads = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="artifacts")  # the store's file reads
        self._loop.set_default_executor(reads)
        self._loop.run_forever()
        reads.shutdown(wait=False, cancel_futures=True)  # a read stuck on a hung disk does not hold up stop()
        self._loop.close()

    @staticmethod
    async def _start(
        servicer: ArtifactServicer, credentials: grpc.ServerCredentials | None, address: str
    ) -> tuple[grpc.aio.Server, int]:
        limits = servicer.limits
        server = grpc.aio.server(
            options=grpc_options(limits, servicer.chunk_bytes), maximum_concurrent_rpcs=limits.grpc_calls
        )
        server.add_generic_rpc_handlers((servicer.handler(),))
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError as exc:  # gRPC's "Failed to bind to address" (older releases returned port 0)
            raise OSError(f"the artifact service cannot listen on {address} (in use, or not this machine's)") from exc
        if port == 0:
            raise OSError(f"the artifact service cannot listen on {address} (in use, or not this machine's)")
        await server.start()
        return server, port

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (running calls get ``grace`` seconds to end), then end the thread. Idempotent."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result()
        self._end()

    def _end(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


def serve(
    root: str | Path,
    address: str = "127.0.0.1:0",
    servicer: ArtifactServicer | None = None,
    credentials: grpc.ServerCredentials | None = None,
    insecure: bool = False,
) -> tuple[ArtifactServer, int]:
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
    server = ArtifactServer(servicer or ArtifactServicer(ArtifactStore(root)), credentials, address)
    return server, server.port


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
    server.stop(grace=2)
    return 0
