"""The release registry: every adapter the server sends out is signed and kept on disk first.

Layout (``<output-dir>/<run-name>/releases/``)::

    round-0000/   the initial adapter (the shared-seed LoRA init), signed
    round-0001/   the aggregate of round 1, ...     each: PEFT files + manifest.json + manifest.sig
    LATEST        the name of the newest release folder

Each manifest names the digest of the previous one (a chain), so a device can tell a replayed
or rolled-back adapter from the next one. The signing key is read once and never leaves the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shared.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from shared.manifest import Manifest
from shared.release import Release, make_release, point_latest, round_folder, save_tensors, write_release
from shared.sign import load_private_key


class Registry:
    """Signs and stores the releases of one run."""

    def __init__(
        self, folder: str | Path, key_path: str | Path, run_id: str, base_digest: str, method: str, config: bytes
    ) -> None:
        self.folder = Path(folder)
        self._key: Any = load_private_key(key_path)  # refuses a key other users can read
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

    def resume(self, release: Release, manifest: Manifest) -> None:
        """Continue the chain after ``release`` (``server/resume.py`` found and verified it)."""
        # a coordinator killed between the two writes left LATEST one behind
        point_latest(self.folder, round_folder(manifest.round))
        self.latest = (release, manifest)
