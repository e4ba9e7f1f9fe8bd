"""The release registry: every adapter the server sends out is signed and kept on disk first.

Layout (``<output-dir>/<run-name>/releases/``)::

    round-0000/   the initial adapter (the shared-seed LoRA init), signed
    round-0001/   the aggregate of round 1, ...     each: PEFT files + manifest.json + manifest.sig
    LATEST        the name of the newest release folder

Each manifest names the digest of the previous one (a chain), so a device can tell a replayed
or rolled-back adapter from the next one. The signing key is read once and never leaves the server.

One coordinator per run folder: a :class:`Registry` holds an exclusive ``flock`` on
``<folder>/.lock`` for the life of its process, so a second coordinator started with the same
run id fails at once (:class:`RunFolderLockedError`) instead of signing a second round N + 1.
Registries of one folder inside one process share that lock (a process is one coordinator; a
restarted coordinator is a new process, and the kernel drops the lock of a killed one).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from shared.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from shared.chain import MAX_LINKS, SignedManifest
from shared.files import FileRefusedError, open_checked, read_bounded
from shared.layout import folder_round, point_latest, round_folder
from shared.manifest import MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, Manifest
from shared.release import MANIFEST, SIGNATURE, Release, make_release, write_release
from shared.sign import load_private_key
from shared.tensors import save_tensors

LOCK_FILE = ".lock"
RECENT_LINKS = 8  # chain manifests a round message carries: a device may miss this many published rounds
_HELD: dict[Path, tuple[IO[str], int]] = {}  # run folder -> (its locked file, registries of this process on it)


class RunFolderLockedError(RuntimeError):
    """Another coordinator process holds the run folder; the message names it and what to do."""


class Registry:
    """Signs and stores the releases of one run.

    Raises
    ------
    RunFolderLockedError
        From the constructor, if another process is the coordinator of ``folder``.
    """

    def __init__(
        self, folder: str | Path, key_path: str | Path, run_id: str, base_digest: str, method: str, config: bytes
    ) -> None:
        self.folder = Path(folder)
        self._key: Any = load_private_key(key_path)  # refuses a key other users can read
        self._locked: Path | None = _lock(self.folder, run_id)
        self.run_id, self.base_digest, self.method = run_id, base_digest, method
        self._config = config
        self.latest: tuple[Release, Manifest] | None = None

    def publish(self, server_round: int, state: Mapping[str, torch.Tensor]) -> tuple[Release, Manifest]:
        """Sign ``state`` as the release of ``server_round``, store it, and return it."""
        files = {ADAPTER_CONFIG: self._config, ADAPTER_WEIGHTS: save_tensors(state)}
        release, manifest = make_release(
            files,
            kind="adapter",
            run_id=self.run_id,
            round=server_round,
            base_digest=self.base_digest,
            method=self.method,
            key=self._key,
            previous=self.latest[1].digest() if self.latest else "",
        )
        write_release(release, self.release_folder(server_round))
        point_latest(self.folder, round_folder(server_round))
        self.latest = (release, manifest)
        return release, manifest

    def release_folder(self, server_round: int) -> Path:
        """Return the folder of the release of ``server_round`` (it exists once published)."""
        return self.folder / round_folder(server_round)

    def recent_links(self, k: int = RECENT_LINKS) -> list[SignedManifest]:
        """Return the signed manifests of the up to ``k`` releases published before the latest, newest first.

        A round message carries them beside the release (``shared.release_records.links_config``):
        a device that missed up to ``k`` published rounds then checks that the release leads back
        to the one it accepted (``shared/chain.py``) without asking the artifact service. Read
        from the run folder, so a resumed coordinator sends them too.
        """
        if self.latest is None or k <= 0:
            return []
        newest = self.latest[1].round
        rounds = sorted(
            (number, path)
            for path in self.folder.glob("round-*")
            if (number := folder_round(path.name)) is not None and number < newest and path.is_dir()
        )
        chosen = rounds[-min(k, MAX_LINKS) :]
        return [_signed_manifest(p) for _, p in reversed(chosen)]

    def resume(self, release: Release, manifest: Manifest) -> None:
        """Continue the chain after ``release`` (``server/resume.py`` found and verified it)."""
        # a coordinator killed between the two writes left LATEST one behind
        point_latest(self.folder, round_folder(manifest.round))
        self.latest = (release, manifest)

    def close(self) -> None:
        """Release this registry's hold on the run folder (the lock goes with the process's last one)."""
        if self._locked is not None:
            _unlock(self._locked)
            self._locked = None


def _lock(folder: Path, run_id: str) -> Path:
    """Take (or share, within this process) the exclusive lock of ``folder``; return its key."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:
        held, users = _HELD[key]
        _HELD[key] = (held, users + 1)
        return key
    try:  # a link planted there would have its target overwritten, a FIFO would not lock anything
        fd, _ = open_checked(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, follow_links=False, mode=0o644)
    except FileRefusedError as exc:
        raise RunFolderLockedError(f"run folder {folder}: its lock {exc}; remove it, then start again") from None
    f = os.fdopen(fd, "r+")  # held open for the life of the process
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read(200).strip() or "another process"
        f.close()
        raise RunFolderLockedError(
            f"run folder {folder} is held by another coordinator ({holder}): two coordinators of run {run_id} "
            f"would both sign its next round. Stop that one first, or start this run with another run-id"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD[key] = (f, 1)
    return key


def _unlock(key: Path) -> None:
    held, users = _HELD[key]
    if users > 1:
        _HELD[key] = (held, users - 1)
        return
    del _HELD[key]
    held.close()  # closing the file drops the flock


def _signed_manifest(folder: Path) -> SignedManifest:
    """Read a release folder's manifest and signature, each within its bound."""
    return SignedManifest(
        read_bounded(folder / MANIFEST, MAX_MANIFEST_BYTES), read_bounded(folder / SIGNATURE, MAX_SIGNATURE_BYTES)
    )
