"""The artifact service's store: the release folders under one root, read-only, nothing outside the root.

An artifact name is its folder relative to the root (``base``, ``adapter/<run-id>/round-0003``); a
final ``latest`` segment resolves through the ``LATEST`` file next to it. Every folder, ``LATEST``
and file is resolved (symlinks followed) and must stay inside the root; one that leaves it is not
found, and logged. Only files the signed manifest lists are served. The gRPC front is
``server/distribute.py``.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from shared.files import FileRefusedError, read_bounded
from shared.manifest import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, ManifestError, parse
from shared.release import FOLDER_NAME, LATEST, MANIFEST, SIGNATURE, ReleaseError, latest_name

log = logging.getLogger("server.distribute")
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
