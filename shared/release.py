"""Signed releases: a set of files, their manifest and its signature; made by the server, verified by devices.

On disk a release is a folder::

    adapter_config.json, adapter_model.safetensors   (a plain PEFT folder: what users load)
    manifest.json                                    (canonical manifest bytes, shared/manifest.py)
    manifest.sig                                     (Ed25519 signature of manifest.json, 64 bytes)

In a Flower round the same bytes travel in the message (``shared/release_records.py`` packs them), so
what a device verifies is exactly what it loads. :func:`verify_release` is the one verifier:
signature by a trusted, unrevoked key; every file present, none extra, every size and SHA-256 equal;
the base digest equal to the device's base; and no replay or rollback against the last release
the device accepted for that run (``shared.replay.AcceptedReleases``).

A run's releases sit side by side in its run folder (``shared/layout.py``); the adapter's
tensors are coded by ``shared/tensors.py``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import fsync_dir, write_atomic
from shared.chain import SignedManifest, verify_links
from shared.errors import ReleaseError
from shared.files import FileRefusedError, read_bounded
from shared.layout import FOLDER_NAME, LATEST, folder_round, follow_latest, latest_name, point_latest, round_folder
from shared.manifest import (
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    Manifest,
    ManifestError,
    parse,
)
from shared.sign import SignatureError, TrustList, key_id, sign

if TYPE_CHECKING:
    from shared.replay import AcceptedReleases
    from shared.tensors import load_tensors, save_tensors

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
# Old import paths of what moved out (one concept per module), kept for the modules that still use them:
# shared/layout.py (server/distribute.py, server/resume.py, simulations/, tests/), shared/tensors.py
# (server/strategy.py, server/server_app.py, simulations/bench/, tests/), shared/errors.py (everywhere).
# The tensor codec and the replay store are resolved on first use (``__getattr__``): importing this module,
# as the edge runtime's fetch and verify do, must not import torch.
__all__ = [
    "FOLDER_NAME",
    "LATEST",
    "MANIFEST",
    "SIGNATURE",
    "Release",
    "ReleaseError",
    "folder_round",
    "follow_latest",
    "latest_name",
    "load_tensors",
    "make_release",
    "point_latest",
    "read_release",
    "round_folder",
    "save_tensors",
    "verify_release",
    "write_release",
]


@dataclass(frozen=True)
class Release:
    """A release in memory: its files (name -> bytes), manifest bytes and signature."""

    files: Mapping[str, bytes]
    manifest_bytes: bytes
    signature: bytes
    checked: tuple[TrustList, bytes, bytes] | None = field(default=None, compare=False, repr=False)
    """The trust list, manifest and signature :func:`read_release` checked before reading the files (once)."""

    def signed_for(self, trust: TrustList) -> bool:
        """Whether :func:`read_release` checked these very manifest and signature objects with ``trust``."""
        c = self.checked
        return c is not None and c[0] is trust and c[1] is self.manifest_bytes and c[2] is self.signature


def make_release(
    files: Mapping[str, bytes],
    *,
    kind: str,
    run_id: str,
    round: int,
    base_digest: str,
    method: str,
    key: Any,
    previous: str = "",
) -> tuple[Release, Manifest]:
    """Hash ``files``, write their manifest, sign it with ``key`` (an Ed25519 private key)."""
    manifest = Manifest(
        kind=kind,
        run_id=run_id,
        round=round,
        files={name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
        sizes={name: len(data) for name, data in sorted(files.items())},
        base_digest=base_digest,
        method=method,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        key_id=key_id(key.public_key()),
        previous=previous,
    )
    data = manifest.canonical()
    return Release(dict(files), data, sign(key, data)), manifest


def write_release(release: Release, folder: str | Path) -> Path:
    """Write a release folder atomically and durably (a reader, or a restart after a power loss, never sees half).

    Each file is written and fsynced in ``<folder>.partial/``, that folder is fsynced, renamed
    into place, and the parent folder fsynced: once this returns, the release survives a crash.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in {**release.files, MANIFEST: release.manifest_bytes, SIGNATURE: release.signature}.items():
        write_atomic(tmp / name, data)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    return folder


def read_release(folder: str | Path, trust: TrustList | None = None) -> Release:
    """Read a release folder: its manifest, its signature and the files the manifest lists.

    Each file is read once, bounded before it is allocated (``shared/files.py``): the manifest and
    signature to their limits, then the manifest is parsed and, with ``trust``, its signature
    checked (a forged or foreign manifest costs no read of the sizes it lists; the rest is
    :func:`verify_release`'s work); a file it does not list is refused before anything of it is
    read; a listed file is read only if it is a plain file (no link followed) of at most its listed
    size. A FIFO or device in any file's place is refused, not waited on.
    """
    folder = Path(folder)
    try:
        manifest_bytes = read_bounded(folder / MANIFEST, MAX_MANIFEST_BYTES)
        signature = read_bounded(folder / SIGNATURE, MAX_SIGNATURE_BYTES)
        listed = parse(manifest_bytes)
        if trust is not None:
            trust.verify(listed.key_id, manifest_bytes, signature)
        paths = sorted(p for p in folder.iterdir() if p.name not in (MANIFEST, SIGNATURE))
        unlisted = [p.name for p in paths if p.name not in listed.files]
        if unlisted:
            raise ReleaseError(f"release files differ from the manifest: unexpected {unlisted[:8]} in {folder}")
        files = {p.name: read_bounded(p, listed.sizes[p.name], follow_links=False) for p in paths}
    except (ManifestError, SignatureError) as exc:
        raise ReleaseError(f"{folder}: {exc}") from None
    except FileNotFoundError as exc:
        raise ReleaseError(f"{folder} is not a release: {Path(exc.filename or folder).name} is missing") from None
    except FileRefusedError as exc:
        raise ReleaseError(f"refused: {exc} (a release holds plain files within their signed sizes)") from None
    except OSError as exc:
        raise ReleaseError(f"{folder}: cannot read the release ({exc})") from None
    except MemoryError:  # listed sizes are bounded, but a small device may not hold them: a refusal, not a crash
        raise ReleaseError(f"{folder}: not enough memory to read the release's files") from None
    return Release(files, manifest_bytes, signature, None if trust is None else (trust, manifest_bytes, signature))


def verify_release(
    release: Release,
    trust: TrustList,
    base_digest: str | None,
    accepted: AcceptedReleases | None = None,
    links: Sequence[SignedManifest] = (),
) -> Manifest:
    """Return the release's manifest if every check passes; else raise :class:`ReleaseError` naming the failed one.

    ``base_digest`` None skips the base check (``fleetlora verify`` without ``--base``);
    ``accepted`` None skips the replay and chain checks; ``links``: signed manifests of the
    run's releases between the accepted one and this one (``shared/chain.py``), each verified.
    """
    try:
        manifest = parse(release.manifest_bytes)
        if not release.signed_for(trust):  # else read_release checked these very bytes with it
            trust.verify(manifest.key_id, release.manifest_bytes, release.signature)
    except (ManifestError, SignatureError) as exc:
        raise ReleaseError(str(exc)) from None
    missing = sorted(set(manifest.files) - set(release.files))
    extra = sorted(set(release.files) - set(manifest.files))
    if missing or extra:
        raise ReleaseError(f"release files differ from the manifest: missing {missing}, unexpected {extra}")
    for name, expected in sorted(manifest.files.items()):
        got = hashlib.sha256(release.files[name]).hexdigest()
        if got != expected:
            raise ReleaseError(f"{name}: SHA-256 {got[:16]}… does not match the manifest's {expected[:16]}…")
        if len(release.files[name]) != manifest.sizes[name]:  # a manifest whose size and hash disagree
            raise ReleaseError(
                f"{name}: {len(release.files[name]):,} bytes, the manifest signs {manifest.sizes[name]:,}"
            )
    check_base(manifest, base_digest)
    if accepted is not None:
        accepted.check(manifest, verify_links(links, trust))
    return manifest


def check_base(manifest: Manifest, base_digest: str | None) -> None:
    """Refuse a release for another base than ``base_digest`` (None: any base)."""
    if base_digest is not None and manifest.base_digest != base_digest:
        raise ReleaseError(
            f"release is for base model {manifest.base_digest[:16]}…, this device has {base_digest[:16]}…"
        )


def __getattr__(name: str) -> Any:
    """Resolve the names that moved out lazily: the tensor codec (torch) and ``AcceptedReleases`` (replay.py)."""
    if name in ("load_tensors", "save_tensors"):
        from shared import tensors

        return getattr(tensors, name)
    if name == "AcceptedReleases":
        from shared.replay import AcceptedReleases

        return AcceptedReleases
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
