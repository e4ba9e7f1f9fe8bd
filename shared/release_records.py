"""A signed release in a Flower message: its files as uint8 arrays, its manifest and signature in the config.

The bytes are the release's own (``shared/release.py``), so the device verifies exactly what it
then loads; a missing part or a mistyped array is a :class:`shared.wire.WireError`.

The config also carries the signed manifests of the run's last few releases before it (the
chain's links, ``shared/chain.py``): a device that missed rounds checks that the release leads
back to the one it accepted without fetching anything (:func:`links_config`, :func:`links_from_config`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.chain import MAX_LINKS, SignedManifest
from shared.manifest import MAX_FILES, MAX_MANIFEST_BYTES
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
    if arrays is None or len(arrays) > MAX_FILES:
        count = "no" if arrays is None else len(arrays)
        raise WireError(f"the message carries {count} release files (1 to {MAX_FILES})")
    files = {name: _file_bytes(name, arr) for name, arr in arrays.items()}
    return Release(files, parts[0], parts[1])


def _file_bytes(name: str, arr: Any) -> bytes:
    """Return a release file's bytes from its array: a 1-D uint8 ``.npy`` whose header and length agree.

    The header is parsed here, not by ``np.load``: a header claiming 1 TiB over 128 bytes of data
    made ``np.load`` try to allocate 1 TiB before anything was checked.
    """
    shape, dtype = tuple(getattr(arr, "shape", ())), getattr(arr, "dtype", None)
    data = getattr(arr, "data", None)
    if getattr(arr, "stype", None) != "numpy.ndarray" or dtype != "uint8" or len(shape) != 1 or type(data) is not bytes:
        what = f"{getattr(arr, 'stype', None)!r:.30} {dtype!r:.20} {shape!r:.40}"
        raise WireError(f"release file {name!r:.80} arrived as {what}, expected a numpy uint8 byte array")
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        header_shape, fortran, header_dtype = read(f, max_header_size=1024)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise WireError(f"release file {name!r:.80}: not a .npy array ({str(exc)[:120]})") from None
    body = len(data) - f.tell()
    if header_shape != shape or header_dtype != np.uint8 or fortran or body != shape[0]:
        raise WireError(
            f"release file {name!r:.80}: its .npy header says {header_dtype} {header_shape!r:.40}, the array "
            f"{dtype} {shape!r:.40}, and {body:,} bytes follow: they do not agree"
        )
    return data[f.tell() :]


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
