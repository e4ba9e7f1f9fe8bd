"""Download one release file from the artifact service: resumable, chunk-checked, never past its signed size.

The size comes from the signed manifest, never from the service: a service that announces or
streams more is cut off at once, so a device stores at most the signed size of each file
(TUF's "endless data" attack). A chunk whose SHA-256 does not match its bytes was damaged in
transit and is fetched again; an interrupted stream resumes from the last byte written, with
exponential backoff, and gives up after ``FetchPolicy.retries`` attempts without progress.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from shared.manifest import sha256_file
from shared.progress import Progress
from shared.proto import artifact_pb2
from shared.text import printable

log = logging.getLogger(__name__)
# the service is down or busy (RESOURCE_EXHAUSTED: its download budget is full), or the transfer broke
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# a Download stream may also be CANCELLED by the service's watchdog (a stalled or too long stream): resume it
STREAM_RETRYABLE = RETRYABLE | {grpc.StatusCode.CANCELLED}
MIN_PROGRESS = 64 * 1024  # bytes one stream must bring (or the rest of the file) to count as progress


class FetchError(RuntimeError):
    """The release could not be fetched (server unreachable after retries, or a refused release)."""


@dataclass
class FetchPolicy:
    """How hard to try: ``retries`` attempts after the first, waiting ``backoff`` x 2^k seconds (capped)."""

    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 8.0
    rpc_timeout: float = 60.0


@dataclass
class Transfer:
    """What downloads cost: bytes received, where files resumed, chunks fetched again."""

    bytes_downloaded: int = 0
    resumed_from: dict[str, int] = field(default_factory=dict)
    chunks_refetched: int = 0


class _DamagedChunkError(Exception):
    """A chunk whose bytes do not match its SHA-256, or a stream that ended early: worth another try."""


def download_file(
    stub: Any,
    artifact: str,
    name: str,
    sha256: str,
    size: int,
    folder: Path,
    policy: FetchPolicy,
    sleep: Callable[[float], None],
    transfer: Transfer,
) -> None:
    """Download ``name`` into ``folder`` until it holds exactly ``size`` bytes whose SHA-256 is ``sha256``.

    ``size`` and ``sha256`` are the signed manifest's. Bytes already in ``folder/name`` (an
    earlier, interrupted fetch) are kept and resumed from; more bytes than ``size`` are never
    written.

    Raises
    ------
    FetchError
        The service sent bytes that do not fit the signed size, stayed unreachable, or the file's
        SHA-256 differs from the manifest's (the file is then deleted).
    """
    path = folder / name
    have = _resumable(path, size)
    if 0 < have < size:
        transfer.resumed_from[name] = have
    progress = Progress(f"{artifact}/{name}", size, start=have)
    try:
        with open(path, "ab") as out:
            _until_complete(stub, artifact, name, size, out, policy, sleep, transfer, progress)
            out.flush()
            os.fsync(out.fileno())
    finally:
        progress.close()
    got = sha256_file(path)
    if got != sha256:
        path.unlink()
        raise FetchError(
            f"{name} of {artifact}: SHA-256 {got[:16]}… does not match the manifest's {sha256[:16]}…; deleted"
        )


def _until_complete(
    stub: Any,
    artifact: str,
    name: str,
    size: int,
    out: IO[bytes],
    policy: FetchPolicy,
    sleep: Callable[[float], None],
    transfer: Transfer,
    progress: Progress,
) -> None:
    """Ask for the rest of the file until ``out`` holds ``size`` bytes; retry with backoff while progress is made.

    Progress means at least ``MIN_PROGRESS`` bytes (or the rest of the file) in one stream: a
    service that trickles a few bytes per stream would otherwise reset the retries for ever (one
    byte a stream: 3,000 streams for 3 kB, years for a base). At the default ``rpc_timeout`` that
    asks about 1 kB/s of a link (the service's whole 1 MiB chunks already ask about 17 kB/s).
    """
    failures = 0
    while out.tell() < size:
        start = out.tell()
        enough = min(MIN_PROGRESS, size - start)
        request = artifact_pb2.DownloadRequest(artifact=artifact, file=name, offset=start)
        call = stub.Download(request, timeout=policy.rpc_timeout)
        try:
            _receive(call, name, size, out, transfer, progress)
            if out.tell() - start < enough:
                raise _DamagedChunkError(
                    f"the stream of {name} ended at byte {out.tell():,} ({out.tell() - start:,} bytes from "
                    f"byte {start:,}), before its {size:,}"
                )
        except (grpc.RpcError, _DamagedChunkError) as exc:
            call.cancel()
            failures = 0 if out.tell() - start >= enough else failures  # progress since the last failure
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.INTERNAL
            if code not in STREAM_RETRYABLE or failures >= policy.retries:
                raise FetchError(
                    f"{name} of {artifact}: download failed at byte {out.tell()}: {describe(exc)}"
                ) from None
            out.flush()
            wait = min(policy.max_backoff, policy.backoff * 2**failures)
            failures += 1
            log.warning("%s: %s; resuming from byte %d in %.1f s", name, describe(exc), out.tell(), wait)
            sleep(wait)
        except FetchError:
            call.cancel()
            raise


def _resumable(path: Path, size: int) -> int:
    """Return how many bytes of ``path`` a resume may keep; delete what it may not."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise FetchError(f"{path} is not a regular file; remove it")
    have = path.stat().st_size if path.exists() else 0
    if have > size:  # a stale partial file longer than the signed size: start over
        log.warning("%s holds %d bytes, more than its signed %d; starting it over", path, have, size)
        path.unlink()
        have = 0
    return have


def _receive(call: Any, name: str, size: int, out: IO[bytes], transfer: Transfer, progress: Progress) -> None:
    """Append the chunks of one Download stream to ``out``; stop the service at the first byte past ``size``."""
    for chunk in call:
        end = out.tell() + len(chunk.data)
        if chunk.offset != out.tell() or end > size or not chunk.data:
            raise FetchError(
                f"{name}: the service sent {len(chunk.data):,} bytes at offset {chunk.offset:,} while the file holds "
                f"{out.tell():,} of its signed {size:,}; cut off (it does not serve the signed release)"
            )
        if hashlib.sha256(chunk.data).digest() != chunk.sha256:
            transfer.chunks_refetched += 1
            raise _DamagedChunkError(f"chunk at {chunk.offset} of {name} is damaged (SHA-256 mismatch)")
        out.write(chunk.data)
        transfer.bytes_downloaded += len(chunk.data)
        progress.update(out.tell())


def retry(call: Callable[[], Any], policy: FetchPolicy, sleep: Callable[[float], None], address: str) -> Any:
    """Run an RPC, retrying retryable failures with exponential backoff."""
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE:
                raise FetchError(f"artifact service at {address}: {describe(exc)}") from None
            if attempt == policy.retries:
                raise FetchError(
                    f"artifact service at {address} unreachable after {policy.retries + 1} attempts: {describe(exc)}"
                ) from None
            wait = min(policy.max_backoff, policy.backoff * 2**attempt)
            log.warning("artifact service at %s: %s; retrying in %.1f s", address, describe(exc), wait)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def describe(exc: BaseException) -> str:
    """One line for an operator: a gRPC status and its details, or the exception's message."""
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {printable(exc.details(), 300)}"  # the host's words, escaped
    return str(exc)
