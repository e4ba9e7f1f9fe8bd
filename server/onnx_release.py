"""Publish the ONNX export of the 4-bit base as a signed release, for devices without torch.

An inference-only device (``fleetlora[edge]``) cannot build the ONNX base itself: the export
(``client/export.py``) dequantizes the base in torch and runs onnxruntime-genai's builder. So
it is built once where torch is (``fleetlora export``, e.g. on the coordinator) and signed here
as a *base* release of its own run, ``<store>/onnx``: the device fetches it like the 4-bit base
(``fleetlora fetch onnx``), and ``shared.release.verify_release``, the one verifier, checks its
signature, every file's SHA-256 and size, and pins it in the replay store (``base:onnx``: a
later one must be newer). Its ``base_digest`` is the 4-bit base's, so the run's adapter
releases verify against it unchanged; it is refused here unless it was exported from the very
base the store publishes.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from shared.errors import ReleaseError
from shared.files import FileRefusedError, read_bounded
from shared.manifest import MAX_FILE_BYTES, MAX_FILES, Manifest, parse, read_manifest
from shared.onnx_base import EXPORT_VERSION, RUN_ID, is_onnx_base, read_export_info
from shared.release import MANIFEST, SIGNATURE, Release, make_release, read_release, write_release


def publish_onnx_base(export: str | Path, store: str | Path, key: Any) -> tuple[Release, Manifest]:
    """Sign the export folder ``export`` as ``<store>/onnx``, bound to the store's 4-bit base.

    Publishing the same export again returns the release already there (same manifest, same
    creation time), so devices that hold it see nothing new.

    Raises
    ------
    ReleaseError
        The store has no base release, the export is not a complete ONNX export (names what is
        missing), holds anything but plain files, or was exported from another base.
    """
    export, store = Path(export), Path(store)
    base_manifest = store / "base" / MANIFEST
    try:
        base = read_manifest(base_manifest)
    except FileNotFoundError:
        raise ReleaseError(f"{store} holds no 4-bit base release ({base_manifest}); run the coordinator once") from None
    except OSError as exc:
        raise ReleaseError(f"{store}: its base release's manifest cannot be read ({exc})") from None
    info = read_export_info(export)
    if info.base_digest != base.base_digest:
        raise ReleaseError(
            f"{export} was exported from base {info.base_digest[:16]}…, the store publishes {base.base_digest[:16]}…"
        )
    files = _export_files(export)
    folder = store / RUN_ID
    if (folder / MANIFEST).is_file():
        try:
            current = read_release(folder)
        except ReleaseError:
            current = None  # an older format or a damaged folder: published again below
        if current is not None and dict(current.files) == files:
            return current, parse(current.manifest_bytes)
    method = f"onnx-{info.options.key()}-v{EXPORT_VERSION}"
    release, manifest = make_release(
        files, kind="base", run_id=RUN_ID, round=0, base_digest=base.base_digest, method=method, key=key
    )
    write_release(release, folder)
    return release, manifest


def _export_files(export: Path) -> dict[str, bytes]:
    """Read every file of the export folder, refusing folders, links and anything beyond the manifest's bounds."""
    paths = sorted(export.iterdir())
    if len(paths) > MAX_FILES:
        raise ReleaseError(f"{export} holds {len(paths)} entries, more than a release's {MAX_FILES}")
    files: dict[str, bytes] = {}
    for path in paths:
        if path.name in (MANIFEST, SIGNATURE):
            raise ReleaseError(f"{path} cannot be a release file (a reserved name)")
        try:
            files[path.name] = read_bounded(path, MAX_FILE_BYTES, follow_links=False)
        except FileRefusedError as exc:
            raise ReleaseError(f"{exc}; an ONNX export is one flat folder of plain files") from None
    if not is_onnx_base(files):
        raise ReleaseError(f"{export} is not a complete ONNX export (model, genai config, corrections, base adapter)")
    return files


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``publish-onnx`` subcommand."""
    p = sub.add_parser("publish-onnx", help="sign an ONNX export of the store's base for torch-free devices")
    p.add_argument("export", type=Path, help="the export folder `fleetlora export` printed")
    p.add_argument("--store", type=Path, default=Path("outputs/store"), help="the coordinator's release store")
    p.add_argument("--key", type=Path, default=Path(".fleetlora/keys/server.key"), help="the signing key")
    p.set_defaults(func=_publish_cli)


def _publish_cli(args: argparse.Namespace) -> int:
    from shared.sign import load_private_key

    _, manifest = publish_onnx_base(args.export, args.store, load_private_key(args.key))
    digest = hashlib.sha256(manifest.canonical()).hexdigest()
    print(f"{args.store / RUN_ID}  (ONNX base of {manifest.base_digest[:16]}…, manifest {digest[:16]}…; "
          f"devices: fleetlora fetch {RUN_ID})")  # fmt: skip
    return 0
