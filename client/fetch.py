"""Fetch a signed release from the artifact service into the device cache: once, resumably, verified.

Steps (``fetch_release``):

1. ask for the manifest and check its signature against the trust list *before* downloading;
2. if ``<cache>/<manifest digest>/`` exists, verify it and return it: a second run downloads nothing;
3. else download each file into ``<cache>/<digest>.partial/<file>``, resuming from the bytes
   already there (also after a crash or a restart), checking each chunk's SHA-256 (a damaged
   chunk is fetched again) and then the file's SHA-256 against the manifest (a mismatch deletes
   the file and is refused, naming it);
4. verify the whole release (``shared.release.verify_release``) and only then move it into place;
5. for an adapter, index it as the server does: ``<cache>/adapter/<run-id>/round-NNNN`` links to
   the release and ``LATEST`` names the newest round fetched, so ``fleetlora infer --adapter
   <cache>/adapter/<run-id>`` follows each new release that a later fetch brings.

An unreachable or failing server is retried with exponential backoff, then refused with a clear
error. Nothing unverified is ever returned.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shared.manifest import Manifest, parse, sha256_file
from shared.progress import Progress
from shared.proto import artifact_pb2, artifact_pb2_grpc
from shared.release import (
    FOLDER_NAME,
    MAX_FILE_BYTES,
    ReleaseError,
    folder_round,
    latest_name,
    point_latest,
    read_release,
    round_folder,
    verify_release,
)
from shared.sign import TrustList

log = logging.getLogger(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}


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
class FetchResult:
    """Where the verified release is, and what this fetch cost."""

    folder: Path
    manifest: Manifest
    bytes_downloaded: int = 0
    resumed_from: dict[str, int] = field(default_factory=dict)
    chunks_refetched: int = 0
    run_folder: Path | None = None
    """For an adapter: ``<cache>/adapter/<run-id>``, whose LATEST names the newest round fetched."""


def fetch_release(
    address: str,
    artifact: str,
    cache: str | Path,
    trust: TrustList,
    base_digest: str | None = None,
    policy: FetchPolicy | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> FetchResult:
    """Fetch ``artifact`` from the service at ``address`` into ``cache``; see the module docstring.

    Raises
    ------
    FetchError
        The server stayed unreachable, or the release failed verification (the message names
        the file or check); nothing of it is left where it could be loaded.
    """
    policy = policy or FetchPolicy()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # one fetcher per cache at a time (devices sharing a disk)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch(address, artifact, cache, trust, base_digest, policy, credentials, sleep)


def _fetch(
    address: str,
    artifact: str,
    cache: Path,
    trust: TrustList,
    base_digest: str | None,
    policy: FetchPolicy,
    credentials: grpc.ChannelCredentials | None,
    sleep: Callable[[float], None],
) -> FetchResult:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = artifact_pb2_grpc.ArtifactServiceStub(channel)
        reply = _retry(
            lambda: stub.GetManifest(artifact_pb2.ManifestRequest(artifact=artifact), timeout=policy.rpc_timeout),
            policy,
            sleep,
            address,
        )
        try:  # signature first: an unsigned or foreign manifest costs no download
            manifest = parse(reply.manifest)
            trust.verify(manifest.key_id, reply.manifest, reply.signature)
        except ValueError as exc:
            raise FetchError(f"{artifact} from {address}: manifest refused: {exc}") from None
        final = cache / manifest.digest()
        if final.is_dir():
            try:
                verify_release(read_release(final), trust, base_digest)
                return FetchResult(final, manifest, run_folder=_index(cache, manifest, final))
            except ReleaseError as exc:
                log.warning("cached %s failed verification (%s); fetching it again", final, exc)
                shutil.rmtree(final)
        partial = cache / f"{manifest.digest()}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "manifest.json").write_bytes(reply.manifest)
        (partial / "manifest.sig").write_bytes(reply.signature)
        result = FetchResult(final, manifest)
        for name, expected in sorted(manifest.files.items()):
            _fetch_file(stub, reply.artifact, name, expected, reply.sizes.get(name, 0), partial, policy, sleep, result)
        try:
            verify_release(read_release(partial), trust, base_digest)
        except ReleaseError as exc:
            raise FetchError(f"{artifact} from {address}: release refused: {exc}") from None
        os.replace(partial, final)
        result.run_folder = _index(cache, manifest, final)
        return result


def _index(cache: Path, manifest: Manifest, folder: Path) -> Path | None:
    """Link an adapter release into ``<cache>/adapter/<run-id>/`` and advance that folder's LATEST.

    Returns the run folder (None for a base, or a run id that is not a plain folder name). LATEST
    never moves back: fetching an older round keeps the newest one named.
    """
    if manifest.kind != "adapter":
        return None
    if not FOLDER_NAME.fullmatch(manifest.run_id):
        log.warning("run id %r is not a plain folder name; %s is not indexed by run", manifest.run_id, folder)
        return None
    run = cache / "adapter" / manifest.run_id
    run.mkdir(parents=True, exist_ok=True)
    name = round_folder(manifest.round)
    tmp = run / f".{name}.link"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(folder, run), target_is_directory=True)
    os.replace(tmp, run / name)
    try:
        current = latest_name(run)
    except ReleaseError as exc:
        log.warning("%s; pointing it at %s", exc, name)
        current = None
    newest = folder_round(current) if current else None
    if newest is None or manifest.round >= newest:
        point_latest(run, name)
    return run


def _fetch_file(
    stub: Any,
    artifact: str,
    name: str,
    expected: str,
    size: int,
    folder: Path,
    policy: FetchPolicy,
    sleep: Callable[[float], None],
    result: FetchResult,
) -> None:
    """Download one file into ``folder``, resuming, until it is complete and its SHA-256 matches."""
    if size > MAX_FILE_BYTES:
        raise FetchError(f"{name} of {artifact}: the server announces {size:,} bytes, more than {MAX_FILE_BYTES:,}")
    path = folder / name
    have = path.stat().st_size if path.exists() else 0
    if have > size:  # a stale partial file of another size: start over
        path.unlink()
        have = 0
    if 0 < have < size:
        result.resumed_from[name] = have
    progress = Progress(f"{artifact}/{name}", size, start=have)
    failures = 0
    with open(path, "ab") as out:
        while out.tell() < size:
            request = artifact_pb2.DownloadRequest(artifact=artifact, file=name, offset=out.tell())
            call = stub.Download(request, timeout=policy.rpc_timeout)
            try:
                for chunk in call:
                    if chunk.offset != out.tell() or out.tell() + len(chunk.data) > size:
                        raise _DamagedChunkError(f"chunk at {chunk.offset} of {name} does not fit the file")
                    if hashlib.sha256(chunk.data).digest() != chunk.sha256:
                        result.chunks_refetched += 1
                        raise _DamagedChunkError(f"chunk at {chunk.offset} of {name} is damaged (SHA-256 mismatch)")
                    out.write(chunk.data)
                    result.bytes_downloaded += len(chunk.data)
                    progress.update(out.tell())
                    failures = 0
            except (grpc.RpcError, _DamagedChunkError) as exc:
                call.cancel()
                code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.INTERNAL
                if code not in RETRYABLE or failures >= policy.retries:
                    progress.close()
                    raise FetchError(
                        f"{name} of {artifact}: download failed at byte {out.tell()}: {_describe(exc)}"
                    ) from None
                out.flush()
                wait = min(policy.max_backoff, policy.backoff * 2**failures)
                failures += 1
                log.warning("%s: %s; resuming from byte %d in %.1f s", name, _describe(exc), out.tell(), wait)
                sleep(wait)
        out.flush()
        os.fsync(out.fileno())
    progress.close()
    got = sha256_file(path)
    if got != expected:
        path.unlink()
        raise FetchError(
            f"{name} of {artifact}: SHA-256 {got[:16]}… does not match the manifest's {expected[:16]}…; deleted"
        )


class _DamagedChunkError(Exception):
    pass


def _retry(call: Callable[[], Any], policy: FetchPolicy, sleep: Callable[[float], None], address: str) -> Any:
    """Run an RPC, retrying retryable failures with exponential backoff."""
    for attempt in range(policy.retries + 1):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE:
                raise FetchError(f"artifact service at {address}: {_describe(exc)}") from None
            if attempt == policy.retries:
                raise FetchError(
                    f"artifact service at {address} unreachable after {policy.retries + 1} attempts: {_describe(exc)}"
                ) from None
            wait = min(policy.max_backoff, policy.backoff * 2**attempt)
            log.warning("artifact service at %s: %s; retrying in %.1f s", address, _describe(exc), wait)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``fetch`` subcommand."""
    p = sub.add_parser("fetch", help="fetch a signed release from the artifact service into the cache, verified")
    p.add_argument("artifact", help="'base', or 'adapter/<run-id>/latest', or 'adapter/<run-id>/round-0003'")
    p.add_argument("--address", default="127.0.0.1:50061", help="the artifact service, HOST:PORT")
    p.add_argument("--trust", type=Path, required=True, help="trust-list file")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: ~/.cache/fleetlora/releases)")
    p.add_argument("--base", help="expected base-model digest; checked if given")
    p.set_defaults(func=_fetch_cli)


def _fetch_cli(args: argparse.Namespace) -> int:
    from shared.model import cache_dir

    cache = args.cache or cache_dir() / "releases"
    result = fetch_release(args.address, args.artifact, cache, TrustList.load(args.trust), args.base)
    m = result.manifest
    print(
        f"{result.folder}  ({m.kind} of run {m.run_id}, round {m.round}, key {m.key_id}; "
        f"{result.bytes_downloaded:,} bytes downloaded)"
    )
    if result.run_folder is not None:
        print(f"newest fetched release of the run: {result.run_folder} (fleetlora infer --adapter follows it)")
    return 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
