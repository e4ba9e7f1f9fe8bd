"""A signed release in a Flower message: its files as uint8 arrays, its manifest and signature in the config.

The bytes are the release's own (``shared/release.py``), so the device verifies exactly what it
then loads; a missing part or a mistyped array is a :class:`shared.wire.WireError`.

The config also carries the signed manifests of the run's last few releases before it (the
chain's links, ``shared/chain.py``): a device that missed rounds checks that the release leads
back to the one it accepted without fetching anything (:func:`links_config`, :func:`links_from_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.chain import MAX_LINKS, SignedManifest
from shared.manifest import MAX_MANIFEST_BYTES
from shared.release import Release
from shared.sign import SIGNATURE_BYTES
from shared.wire import WireError

RELEASE_MANIFEST, RELEASE_SIGNATURE = "release-manifest", "release-signature"  # keys in the message's config
LINK_MANIFESTS, LINK_SIGNATURES = "release-links-manifests", "release-links-signatures"


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


def links_config(links: Sequence[SignedManifest]) -> dict[str, list[bytes]]:
    """Return the config entries that carry ``links`` (``server.registry.Registry.recent_links``)."""
    return {LINK_MANIFESTS: [link.manifest for link in links], LINK_SIGNATURES: [link.signature for link in links]}


def links_from_config(config: Any) -> list[SignedManifest]:
    """Inverse of :func:`links_config`, bounded before use; none in the message is an empty list.

    Raises
    ------
    WireError
        The two lists do not pair up, hold more than ``MAX_LINKS`` entries, or an entry is not
        bytes of a plausible size. The links' signatures are checked later (``shared.chain.verify_links``).
    """
    manifests, signatures = (
        config.get(key, []) if config is not None else [] for key in (LINK_MANIFESTS, LINK_SIGNATURES)
    )
    if not (isinstance(manifests, list) and isinstance(signatures, list)) or len(manifests) != len(signatures):
        raise WireError(f"the message's '{LINK_MANIFESTS}' and '{LINK_SIGNATURES}' are not two lists of one length")
    if len(manifests) > MAX_LINKS:
        raise WireError(f"the message carries {len(manifests)} chain manifests, more than {MAX_LINKS}")
    for manifest, signature in zip(manifests, signatures, strict=True):
        if not (isinstance(manifest, bytes) and len(manifest) <= MAX_MANIFEST_BYTES):
            raise WireError(f"a chain manifest in the message is not bytes of at most {MAX_MANIFEST_BYTES:,}")
        if not (isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
            raise WireError(f"a chain signature in the message is not {SIGNATURE_BYTES} bytes")
    return [SignedManifest(m, s) for m, s in zip(manifests, signatures, strict=True)]
