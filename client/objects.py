"""The device cache's content store: every release file kept once, by its SHA-256, whatever release it came in.

    <cache>/objects/<sha256>      one file per content; release folders hold hard links to it

A coordinator that quantizes the same source again (a lost store, a second coordinator) signs a
new base release, with a new manifest, of the same bytes (quantization is reproducible). The
device then neither downloads nor stores them twice: before a download, every file of the new
manifest whose SHA-256 the store holds is hard-linked into the partial folder (the downloader
finds it complete, and checks its hash as for any file); after a release is verified, its files
join the store. An object is re-hashed before it is linked: a damaged one is deleted, never used
(the file is downloaded instead). Where hard links are impossible (another file system), the
store is skipped and files are downloaded as before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from shared.manifest import Manifest, sha256_file

log = logging.getLogger(__name__)

OBJECTS = "objects"


def seed(cache: Path, manifest: Manifest, partial: Path) -> int:
    """Hard-link into ``partial`` each file of ``manifest`` the store holds intact; return the bytes linked."""
    linked = 0
    for name, sha256 in sorted(manifest.files.items()):
        target = partial / name
        obj = _intact(cache, sha256, manifest.sizes[name])
        if obj is None or target.exists() or target.is_symlink():
            continue
        try:
            os.link(obj, target)
        except OSError as exc:
            log.info("content store: cannot link %s (%s); downloading it", name, exc)
            continue
        linked += manifest.sizes[name]
    return linked


def keep(cache: Path, manifest: Manifest, folder: Path) -> None:
    """Put the files of a verified release in ``folder`` into the store, or link them to the copy it already holds."""
    store = cache / OBJECTS
    store.mkdir(exist_ok=True)
    for name, sha256 in sorted(manifest.files.items()):
        path, obj = folder / name, store / sha256
        try:
            if not obj.exists():
                os.link(path, obj)
            elif not os.path.samefile(path, obj) and _intact(cache, sha256, manifest.sizes[name]) is not None:
                spare = store / f"{sha256}.link"  # beside the objects: a crash leaves nothing in a release folder
                spare.unlink(missing_ok=True)
                os.link(obj, spare)
                os.replace(spare, path)  # same bytes (both hashed): the release now takes no space of its own
        except OSError as exc:
            log.info("content store: %s of %s not stored once (%s)", name, folder.name, exc)


def _intact(cache: Path, sha256: str, size: int) -> Path | None:
    """Return the store's object of ``sha256`` if it is a regular file of ``size`` bytes and that hash, else None."""
    obj = cache / OBJECTS / sha256
    if obj.is_symlink() or not obj.is_file() or obj.stat().st_size != size:
        return None
    if sha256_file(obj) != sha256:
        log.warning("content store: %s is damaged (its SHA-256 differs); deleted, the file is downloaded", obj)
        obj.unlink()
        return None
    return obj
