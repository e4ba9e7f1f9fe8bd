"""Release manifests: what a signature binds, in one canonical byte form.

A manifest names one released artifact (the base model or a round's aggregated adapter) and
binds every fact a device checks before loading it::

    {"format": 1, "kind": "adapter", "run_id": "demo-8141", "round": 3,
     "files": {"adapter_config.json": "<sha256>", "adapter_model.safetensors": "<sha256>"},
     "base_digest": "<sha256 of the base model>", "method": "fedavg",
     "created": "2026-11-24T05:00:00Z", "key_id": "<16 hex>", "previous": "<sha256 of the
     previous manifest of the same run, or empty for the first>"}

Canonical bytes: sorted-key JSON, no insignificant whitespace, UTF-8. The signature is over
those bytes, and :func:`parse` refuses any other spelling of the same content, so one
manifest has exactly one byte form and one digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
KINDS = ("base", "adapter")
MAX_MANIFEST_BYTES = 64 * 1024  # a manifest lists a handful of files; anything larger is not one
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
    base_digest: str
    method: str
    created: str
    key_id: str
    previous: str = ""
    format: int = FORMAT

    def __post_init__(self) -> None:
        _check_fields(asdict(self))

    def canonical(self) -> bytes:
        """Return the exact bytes that are signed and hashed."""
        return canonical_json({**asdict(self), "files": dict(self.files)})

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical bytes: how the next release of the run names this one."""
        return hashlib.sha256(self.canonical()).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Sorted-key, compact, UTF-8 JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse(data: bytes) -> Manifest:
    """Parse manifest bytes, refusing anything that is not one canonical, well-formed manifest.

    Raises
    ------
    ManifestError
        Naming what is wrong: size, encoding, JSON, a missing/unknown/mistyped field, or a
        non-canonical byte form.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data):,} bytes, more than {MAX_MANIFEST_BYTES:,}")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"manifest is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"manifest must be a JSON object, got {type(obj).__name__}")
    _check_fields(obj)
    manifest = Manifest(**obj)
    if manifest.canonical() != data:
        raise ManifestError("manifest bytes are not in canonical form (sorted keys, compact, UTF-8)")
    return manifest


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        (0 < len(obj["run_id"]) <= 200, "run_id", "must be 1 to 200 characters"),
        (obj["round"] >= 0, "round", "must be >= 0"),
        (bool(_HEX64.fullmatch(obj["base_digest"])), "base_digest", "must be 64 lowercase hex digits"),
        (len(obj["method"]) <= 64, "method", "must be at most 64 characters"),
        (bool(_TIME.fullmatch(obj["created"])), "created", "must be UTC time as YYYY-MM-DDTHH:MM:SSZ"),
        (bool(_KEY_ID.fullmatch(obj["key_id"])), "key_id", "must be 16 lowercase hex digits"),
        (obj["previous"] == "" or bool(_HEX64.fullmatch(obj["previous"])), "previous", "must be empty or 64 hex"),
        (0 < len(obj["files"]) <= 64, "files", "must list 1 to 64 files"),
    ]
    for ok, name, rule in rules:
        if not ok:
            raise ManifestError(f"manifest field '{name}' = {obj[name]!r:.80} {rule}")
    for name, digest in obj["files"].items():
        if not (isinstance(name, str) and _FILE_NAME.fullmatch(name)):
            raise ManifestError(f"manifest lists a file named {name!r:.80}: only plain file names are allowed")
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            raise ManifestError(f"manifest hash of '{name}' must be 64 lowercase hex digits")
