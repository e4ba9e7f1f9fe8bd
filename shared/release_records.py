"""A signed release in a Flower message: its files as uint8 arrays, its manifest and signature in the config.

The bytes are the release's own (``shared/release.py``), so the device verifies exactly what it
then loads; a missing part or a mistyped array is a :class:`shared.wire.WireError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.release import Release
from shared.wire import WireError

RELEASE_MANIFEST, RELEASE_SIGNATURE = "release-manifest", "release-signature"  # keys in the message's config


def release_to_records(release: Release) -> tuple[Any, dict[str, bytes]]:
    """Pack a release as a Flower message carries it: files as uint8 arrays, manifest and signature as config.

    The bytes are the release's own, so the device verifies exactly what it then loads.
    """
    from flwr.app import Array, ArrayRecord

    arrays = ArrayRecord({name: Array(np.frombuffer(data, dtype=np.uint8)) for name, data in release.files.items()})
    return arrays, release_config(release)


def release_config(release: Release) -> dict[str, bytes]:
    """Return the config entries of a release in a message: its manifest and signature."""
    return {RELEASE_MANIFEST: release.manifest_bytes, RELEASE_SIGNATURE: release.signature}


def release_from_records(arrays: Any, config: Any) -> Release:
    """Inverse of :func:`release_to_records`; a missing part or a non-byte array is a :class:`WireError`."""
    parts = []
    for key in (RELEASE_MANIFEST, RELEASE_SIGNATURE):
        value = config.get(key) if config is not None else None
        if not isinstance(value, bytes):
            raise WireError(f"the message carries no '{key}' (bytes); the adapter is unsigned")
        parts.append(value)
    files = {}
    for name, arr in arrays.items():
        if arr.dtype != "uint8" or len(arr.shape) != 1:
            raise WireError(f"release file {name} arrived as {arr.dtype} {tuple(arr.shape)}, expected uint8 bytes")
        files[name] = arr.numpy().tobytes()
    return Release(files, parts[0], parts[1])
