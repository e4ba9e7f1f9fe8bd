"""Release manifests: what a signature binds, in one canonical byte form.

A manifest names one released artifact (the base model or a round's aggregated adapter) and
binds every fact a device checks before loading it::

    {"format": 2, "kind": "adapter", "run_id": "demo-8141", "round": 3,
     "files": {"adapter_config.json": "<sha256>", "adapter_model.safetensors": "<sha256>"},
     "sizes": {"adapter_config.json": 1206, "adapter_model.safetensors": 4884328},
     "base_digest": "<sha256 of the base model>", "method": "fedavg",
     "created": "2026-11-24T05:00:00Z", "key_id": "<16 hex>", "previous": "<sha256 of the
     previous published manifest of the same run, or empty for the first>"}

``sizes`` is signed so that a device never stores more of a file than the release holds,
whatever the network or the artifact service announces (TUF's "endless data" attack).
Format 1 (no sizes) is refused by name.

Canonical bytes: sorted-key JSON, no insignificant whitespace, UTF-8. The signature is over
those bytes, and :func:`parse` refuses any other spelling of the same content, so one
manifest has exactly one byte form and one digest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.files import open_regular, read_bounded

FORMAT = 2
OLD_FORMATS = {1: "it signs no file sizes"}  # why a device refuses each older format
KINDS = ("base", "adapter")
MAX_MANIFEST_BYTES = 64 * 1024  # a manifest lists a handful of files; anything larger is not one
MAX_SIGNATURE_BYTES = 1024  # its signature file: an Ed25519 signature is 64 bytes; more is not one
MAX_FILES = 64
MAX_FILE_BYTES = 2 << 30  # no single release file is larger (a 4-bit base of a 1B model is < 1 GB)
MAX_RELEASE_BYTES = 4 << 30  # nor all of a release's files together
MAX_ROUND = 10**9
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a plain file name: no folders, no '..'
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
_TYPES: dict[str, type] = {
    "format": int,
    "kind": str,
    "run_id": str,
    "round": int,
    "files": dict,
    "sizes": dict,
    "base_digest": str,
    "method": str,
    "created": str,
    "key_id": str,
    "previous": str,
}


class ManifestError(ValueError):
    """A manifest is malformed; the message names the field and what is wrong with it."""


@dataclass(frozen=True)
class Manifest:
    """One release's facts; see the module docstring for each field."""

    kind: str
    run_id: str
    round: int
    files: Mapping[str, str]
    sizes: Mapping[str, int]
    base_digest: str
    method: str
    created: str
    key_id: str
    previous: str = ""
    format: int = FORMAT

    def __post_init__(self) -> None:
        _check_fields({**asdict(self), "files": dict(self.files), "sizes": dict(self.sizes)})

    def canonical(self) -> bytes:
        """Return the exact bytes that are signed and hashed."""
        return canonical_json({**asdict(self), "files": dict(self.files), "sizes": dict(self.sizes)})

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical bytes: how the next release of the run names this one."""
        return hashlib.sha256(self.canonical()).hexdigest()

    def created_at(self) -> dt.datetime:
        """Return ``created`` as an aware UTC datetime."""
        return dt.datetime.strptime(self.created, TIME_FORMAT).replace(tzinfo=dt.UTC)


def canonical_json(obj: Any) -> bytes:
    """Sorted-key, compact, UTF-8 JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse(data: bytes) -> Manifest:
    """Parse manifest bytes, refusing anything that is not one canonical, well-formed manifest.

    Raises
    ------
    ManifestError
        Naming what is wrong: size, encoding, JSON, an older format, a missing/unknown/mistyped
        field, or a non-canonical byte form.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data):,} bytes, more than {MAX_MANIFEST_BYTES:,}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer of more than 4300 digits, deep nesting
        raise ManifestError(f"manifest is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"manifest must be a JSON object, got {type(obj).__name__}")
    old = obj.get("format")
    if type(old) is int and old in OLD_FORMATS:
        raise ManifestError(
            f"manifest format {old} is no longer accepted ({OLD_FORMATS[old]}); this device needs format "
            f"{FORMAT}: the release was signed by an older fleetlora, sign it again with this one"
        )
    _check_fields(obj)
    manifest = Manifest(**obj)
    if manifest.canonical() != data:
        raise ManifestError("manifest bytes are not in canonical form (sorted keys, compact, UTF-8)")
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    """Parse the manifest file ``path`` (unverified: for choosing and comparing, never for trusting).

    Read with :func:`shared.files.read_bounded`: a FIFO in its place is refused, not waited on, and
    more than ``MAX_MANIFEST_BYTES`` is never read.

    Raises
    ------
    OSError
        Missing, unreadable, not a regular file or too large (``FileRefusedError``).
    ManifestError
        Its bytes are not a manifest (:func:`parse`).
    """
    return parse(read_bounded(path, MAX_MANIFEST_BYTES))


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of the regular file ``path`` (a FIFO in its place is refused, not waited on)."""
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_fields(obj: Mapping[str, Any]) -> None:
    missing, unknown = sorted(set(_TYPES) - set(obj)), sorted(set(obj) - set(_TYPES))
    if missing or unknown:
        raise ManifestError(f"manifest fields: missing {missing}, unknown {unknown}")
    for name, kind in _TYPES.items():
        if type(obj[name]) is not kind:  # exact type: a bool is not a round number
            raise ManifestError(f"manifest field '{name}' must be {kind.__name__}, got {type(obj[name]).__name__}")
    rules = [
        (obj["format"] == FORMAT, "format", f"must be {FORMAT}"),
        (obj["kind"] in KINDS, "kind", f"must be one of {KINDS}"),
        (_is_text(obj["run_id"], 1, 200), "run_id", "must be 1 to 200 printable characters"),
        (0 <= obj["round"] <= MAX_ROUND, "round", f"must be 0 to {MAX_ROUND:,}"),
        (bool(_HEX64.fullmatch(obj["base_digest"])), "base_digest", "must be 64 lowercase hex digits"),
        (_is_text(obj["method"], 0, 64), "method", "must be at most 64 printable characters"),
        (_is_time(obj["created"]), "created", "must be UTC time as YYYY-MM-DDTHH:MM:SSZ"),
        (bool(_KEY_ID.fullmatch(obj["key_id"])), "key_id", "must be 16 lowercase hex digits"),
        (obj["previous"] == "" or bool(_HEX64.fullmatch(obj["previous"])), "previous", "must be empty or 64 hex"),
        (0 < len(obj["files"]) <= MAX_FILES, "files", f"must list 1 to {MAX_FILES} files"),
    ]
    for ok, name, rule in rules:
        if not ok:
            raise ManifestError(f"manifest field '{name}' = {obj[name]!r:.80} {rule}")
    for name, digest in obj["files"].items():
        if not (isinstance(name, str) and _FILE_NAME.fullmatch(name)):
            raise ManifestError(f"manifest lists a file named {name!r:.80}: only plain file names are allowed")
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            raise ManifestError(f"manifest hash of '{name}' must be 64 lowercase hex digits")
    _check_sizes(obj["files"], obj["sizes"])


def _is_text(text: str, shortest: int, longest: int) -> bool:
    # printable: no control characters (a run id is logged and shown) and no lone surrogates (not UTF-8)
    return shortest <= len(text) <= longest and text.isprintable()


def _is_time(text: str) -> bool:
    if not _TIME.fullmatch(text):
        return False
    try:
        dt.datetime.strptime(text, TIME_FORMAT)
    except ValueError:  # 2026-13-45T...: the right shape, not a time
        return False
    return True


def _check_sizes(files: Mapping[str, str], sizes: Mapping[Any, Any]) -> None:
    if set(sizes) != set(files):
        missing, extra = sorted(set(files) - set(sizes)), sorted(map(str, set(sizes) - set(files)))
        raise ManifestError(f"manifest sizes must name exactly its files: missing {missing}, unknown {extra}")
    for name, size in sizes.items():
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise ManifestError(f"manifest size of '{name}' = {size!r:.40} must be an integer 0 to {MAX_FILE_BYTES:,}")
    if sum(sizes.values()) > MAX_RELEASE_BYTES:
        raise ManifestError(f"manifest files total {sum(sizes.values()):,} bytes, more than {MAX_RELEASE_BYTES:,}")
