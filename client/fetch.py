"""Fetch a signed release from the artifact service into the device cache: once, resumably, verified.

Steps (``fetch_release``):

1. ask for the manifest and check its signature against the trust list *before* downloading;
2. if ``<cache>/<manifest digest>/`` exists, verify it and return it: a second run downloads nothing;
3. else download each file into ``<cache>/<digest>.partial/<file>`` (``client/download.py``),
   never past the size the manifest signs (what the service announces is not trusted), resuming
   from the bytes already there (also after a crash or a restart), checking each chunk's SHA-256
   (a damaged chunk is fetched again) and then the file's SHA-256 against the manifest (a
   mismatch deletes the file and is refused, naming it);
4. verify the whole release (``shared.release.verify_release``) and only then move it into place;
5. for an adapter, index it as the server does: ``<cache>/adapter/<run-id>/round-NNNN`` links to
   the release and ``LATEST`` names the newest round fetched, so ``fleetlora infer --adapter
   <cache>/adapter/<run-id>`` follows each new release that a later fetch brings;
6. every file is kept once by its content (``client/objects.py``): a release whose files the cache
   already holds (a re-created base of the same bytes) is linked, not downloaded or stored again.

An unreachable or failing server is retried with exponential backoff, then refused with a clear
error. Nothing unverified is ever returned.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from client import channel, objects
from client.download import FetchError, FetchPolicy, Transfer, download_file, retry
from shared.atomic import fsync_dir, write_atomic
from shared.chain import MAX_CATCH_UP, ChainGapError, SignedManifest, verify_links
from shared.errors import ReleaseError
from shared.layout import FOLDER_NAME, PARTIAL, folder_round, latest_name, point_latest, round_folder
from shared.manifest import Manifest, parse
from shared.onnx_base import RUN_ID as ONNX_RUN_ID
from shared.proto import artifact_pb2, artifact_pb2_grpc
from shared.release import MANIFEST, SIGNATURE, check_base, read_release, verify_release
from shared.replay import AcceptedReleases, default_state_file
from shared.sign import TrustList
from shared.text import printable

__all__ = ["FetchError", "FetchPolicy", "FetchResult", "fetch_links", "fetch_release", "register"]
log = logging.getLogger(__name__)


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
    accepted: AcceptedReleases | None = None,
) -> FetchResult:
    """Fetch ``artifact`` from the service at ``address`` into ``cache``; see the module docstring.

    ``accepted``: the device's replay store. A release older than (or forking from) the last one
    it accepted of the same run is refused before any download; a fetched release is recorded.

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
        result = _fetch(address, artifact, cache, trust, base_digest, policy, credentials, sleep, accepted)
        if accepted is not None:
            try:
                accepted.accept(result.manifest)  # durable before the caller uses it
            except ReleaseError as exc:
                raise FetchError(f"{artifact} from {address}: {exc}") from None
        return result


def _fetch(
    address: str,
    artifact: str,
    cache: Path,
    trust: TrustList,
    base_digest: str | None,
    policy: FetchPolicy,
    credentials: grpc.ChannelCredentials | None,
    sleep: Callable[[float], None],
    accepted: AcceptedReleases | None,
) -> FetchResult:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = artifact_pb2_grpc.ArtifactServiceStub(channel)
        reply = retry(
            lambda: stub.GetManifest(artifact_pb2.ManifestRequest(artifact=artifact), timeout=policy.rpc_timeout),
            policy,
            sleep,
            address,
        )
        try:  # signature first: an unsigned or foreign manifest costs no download
            manifest = parse(reply.manifest)
            trust.verify(manifest.key_id, reply.manifest, reply.signature)
            _check_asked(artifact, manifest)
            check_base(manifest, base_digest)  # on the signed manifest: a release for another base costs nothing
            if accepted is not None:  # a replayed, rolled-back or off-chain manifest costs no download either
                _check_follows(stub, manifest, accepted, trust, policy, sleep, address)
        except ValueError as exc:
            raise FetchError(f"{artifact} from {address}: manifest refused: {exc}") from None
        final = cache / manifest.digest()
        if final.is_dir():
            try:
                cached = read_release(final, trust)
                if cached.manifest_bytes != reply.manifest:  # named by this digest, it must hold this manifest
                    raise ReleaseError("it holds another release than its name says")
                verify_release(cached, trust, base_digest)
                return FetchResult(final, manifest, run_folder=_index(cache, manifest, final))
            except ReleaseError as exc:
                log.warning("cached %s failed verification (%s); fetching it again", final, exc)
                shutil.rmtree(final)
        partial = _partial(cache, manifest, reply)
        transfer = _download(stub, reply, manifest, partial, policy, sleep, address)
        try:
            verify_release(read_release(partial, trust), trust, base_digest)
        except ReleaseError as exc:
            shutil.rmtree(partial)  # every file matched its hash: what failed is the release as a whole
            raise FetchError(f"{artifact} from {address}: release refused: {exc}") from None
        os.replace(partial, final)  # its files were fsynced as they completed
        fsync_dir(cache)
        objects.keep(cache, manifest, final)
        return FetchResult(
            final,
            manifest,
            transfer.bytes_downloaded,
            transfer.resumed_from,
            transfer.chunks_refetched,
            run_folder=_index(cache, manifest, final),
        )


def _check_asked(artifact: str, manifest: Manifest) -> None:
    """Refuse a signed manifest that is not of the artifact asked for (kind, run, round), where its name says.

    ``base`` is the 4-bit base, ``onnx`` the ONNX base, ``adapter/<run>/latest`` and
    ``adapter/<run>/round-NNNN`` a run's releases; any other name (an operator's alias in the
    store) says nothing. A host that answers with another signed release (another run's, the
    other base) is refused: the signature says who made a release, not that it is the one asked for.

    Raises
    ------
    ValueError
        What the manifest is, and what was asked.
    """
    parts = artifact.split("/")
    asked: dict[str, Any] = {}
    if parts == [ONNX_RUN_ID]:
        asked = {"kind": "base", "run_id": ONNX_RUN_ID}
    elif parts == ["base"] and manifest.run_id == ONNX_RUN_ID:
        raise ValueError(f"asked for 'base', the service sent the ONNX base (run_id '{ONNX_RUN_ID}')")
    elif parts == ["base"]:  # a 4-bit base: its run id is the publisher's
        asked = {"kind": "base"}
    elif len(parts) == 3 and parts[0] == "adapter":
        asked = {"kind": "adapter", "run_id": parts[1]}
        if (number := folder_round(parts[2])) is not None:
            asked["round"] = number
    wrong = {k: getattr(manifest, k) for k, v in asked.items() if getattr(manifest, k) != v}
    if wrong:
        got = ", ".join(f"{k} {v!r:.80}" for k, v in wrong.items())
        raise ValueError(f"asked for {artifact!r:.120}, the service sent a signed release of {got}")


def _download(
    stub: Any,
    reply: Any,
    manifest: Manifest,
    partial: Path,
    policy: FetchPolicy,
    sleep: Callable[[float], None],
    address: str,
) -> Transfer:
    """Download every file of ``manifest`` into ``partial``, each bounded by its signed size."""
    transfer = Transfer()
    for name in sorted(manifest.files):
        size, sha256 = manifest.sizes[name], manifest.files[name]
        if reply.sizes.get(name, size) != size:
            log.warning(
                "%s from %s announces %d bytes for %s, its signed manifest %d: only the signed size is fetched",
                printable(reply.artifact, 120), address, reply.sizes[name], name, size,
            )  # fmt: skip
        download_file(stub, reply.artifact, name, sha256, size, partial, policy, sleep, transfer)
    return transfer


def _check_follows(
    stub: Any,
    manifest: Manifest,
    accepted: AcceptedReleases,
    trust: TrustList,
    policy: FetchPolicy,
    sleep: Callable[[float], None],
    address: str,
) -> None:
    """Check ``manifest`` against the replay store, fetching the run's missing chain manifests if it needs them."""
    try:
        accepted.check(manifest)
    except ChainGapError as gap:
        links = _chain_links(stub, manifest, gap.accepted_round, trust, policy, sleep, address)
        accepted.check(manifest, [verified for _, verified in links])


def fetch_links(
    address: str,
    manifest: Manifest,
    accepted_round: int,
    trust: TrustList,
    credentials: grpc.ChannelCredentials | None = None,
    policy: FetchPolicy | None = None,
) -> list[SignedManifest]:
    """Fetch the signed manifests of the run's releases between ``accepted_round`` and ``manifest.round``.

    For a device that missed more rounds than its round message carries links for
    (``shared/chain.py``); rounds that published nothing are skipped. Each is signature-checked as
    it arrives (so only signed ones are held), and ``verify_release`` checks them again with the
    release they lead to.

    Raises
    ------
    FetchError
        The service is unreachable, more than ``MAX_CATCH_UP`` rounds are missing, or a manifest it
        sends is not one the trust list signed (checked as it arrives: only signed manifests are held).
    """
    policy = policy or FetchPolicy()
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = artifact_pb2_grpc.ArtifactServiceStub(channel)
        links = _chain_links(stub, manifest, accepted_round, trust, policy, time.sleep, address)
    return [signed for signed, _ in links]


def _chain_links(
    stub: Any,
    manifest: Manifest,
    accepted_round: int,
    trust: TrustList,
    policy: FetchPolicy,
    sleep: Callable[[float], None],
    address: str,
) -> list[tuple[SignedManifest, Manifest]]:
    """Fetch the run's manifests between ``accepted_round`` and ``manifest``; return each with its verified parse."""
    missing = range(manifest.round - 1, accepted_round, -1)
    if len(missing) > MAX_CATCH_UP:
        raise FetchError(
            f"round {manifest.round} of run {manifest.run_id}: this device accepted round {accepted_round}, "
            f"{len(missing)} rounds behind, more than the {MAX_CATCH_UP:,} it fetches the chain through; refused"
        )
    links = []
    for number in missing:
        reply = _manifest_if_any(stub, f"adapter/{manifest.run_id}/{round_folder(number)}", policy, sleep, address)
        if reply is not None:  # None: a round that published nothing
            link = SignedManifest(reply.manifest, reply.signature)
            try:  # now, not after thousands: a host's unsigned filler is never held
                (verified,) = verify_links([link], trust)
            except ReleaseError as exc:
                raise FetchError(f"round {number} of run {manifest.run_id} from {address}: {exc}") from None
            links.append((link, verified))
    return links


def _manifest_if_any(
    stub: Any, artifact: str, policy: FetchPolicy, sleep: Callable[[float], None], address: str
) -> Any | None:
    def call() -> Any | None:
        try:
            return stub.GetManifest(artifact_pb2.ManifestRequest(artifact=artifact), timeout=policy.rpc_timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    return retry(call, policy, sleep, address)


def _partial(cache: Path, manifest: Manifest, reply: Any) -> Path:
    """Return ``<cache>/<digest>.partial/`` holding the signed manifest and only what a resume may use.

    Raises
    ------
    FetchError
        The cache's disk lacks room for the rest of the release (its signed sizes).
    """
    partial = cache / f"{manifest.digest()}{PARTIAL}"
    partial.mkdir(parents=True, exist_ok=True)
    for path in partial.iterdir():
        if path.name not in manifest.files:  # left by another version, or not a release file at all
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    write_atomic(partial / MANIFEST, reply.manifest)
    write_atomic(partial / SIGNATURE, reply.signature)
    objects.seed(cache, manifest, partial)  # files of the same content as a release held: neither fetched nor stored
    have = {p.name: p.stat().st_size for p in partial.iterdir() if p.is_file() and p.name in manifest.files}
    needed = sum(size - min(have.get(name, 0), size) for name, size in manifest.sizes.items())
    free = shutil.disk_usage(partial).free
    if needed > free:
        raise FetchError(f"{partial} needs {needed:,} more bytes for the release, {free:,} are free on its disk")
    return partial


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
    fsync_dir(run)
    try:
        current = latest_name(run)
    except ReleaseError as exc:
        log.warning("%s; pointing it at %s", exc, name)
        current = None
    newest = folder_round(current) if current else None
    if newest is None or manifest.round >= newest:
        point_latest(run, name)
    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``fetch`` subcommand."""
    p = sub.add_parser("fetch", help="fetch a signed release from the artifact service into the cache, verified")
    p.add_argument("artifact", help="'base', or 'adapter/<run-id>/latest', or 'adapter/<run-id>/round-0003'")
    p.add_argument("--address", default="127.0.0.1:50061", help="the artifact service, HOST:PORT")
    p.add_argument("--trust", type=Path, required=True, help="trust-list file")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: ~/.cache/fleetlora/releases)")
    p.add_argument("--base", help="expected base-model digest; checked if given")
    p.add_argument(
        "--state", type=Path, default=None,
        help="replay store: the releases this device accepted (default: <cache>/accepted.json, as fleetlora infer)",
    )  # fmt: skip
    channel.add_arguments(p)
    p.set_defaults(func=_fetch_cli)


def _fetch_cli(args: argparse.Namespace) -> int:
    from shared.model import cache_dir

    cache = args.cache or cache_dir() / "releases"
    accepted = AcceptedReleases(args.state or default_state_file(cache))
    trust, credentials = TrustList.load(args.trust), channel.credentials_from_args(args)
    result = fetch_release(
        args.address, args.artifact, cache, trust, args.base, credentials=credentials, accepted=accepted
    )
    m = result.manifest
    print(
        f"{result.folder}  ({m.kind} of run {m.run_id}, round {m.round}, key {m.key_id}; "
        f"{result.bytes_downloaded:,} bytes downloaded)"
    )
    if result.run_folder is not None:
        print(f"newest fetched release of the run: {result.run_folder} (fleetlora infer --adapter follows it)")
    return 0
