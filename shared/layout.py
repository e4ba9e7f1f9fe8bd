"""The run-folder layout: a run's releases side by side, ``round-NNNN/`` each, and ``LATEST`` naming the newest.

The server's registry, its artifact service and a device's fetch cache all use this one layout::

    <run folder>/round-0000/, round-0001/, ...   release folders (``shared/release.py``)
    <run folder>/LATEST                          the name of the newest, written atomically

``LATEST`` holds one plain folder name, never a path: a pointer that could leave the run
folder is refused when it is written and when it is read.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.atomic import write_atomic
from shared.errors import ReleaseError
from shared.files import FileRefusedError, read_bounded

LATEST = "LATEST"
_ROUND_FOLDER = re.compile(r"round-(\d{4,})")
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one plain path segment: no '/', no '..'
PARTIAL = ".partial"  # a device cache's unfinished download: <cache>/<digest>.partial/ (client/fetch.py)
MAX_LATEST_BYTES = 256  # LATEST holds one folder name (at most 128 characters) and a newline


def round_folder(server_round: int) -> str:
    """Return the name of a round's release folder in its run folder (``round-0003``)."""
    return f"round-{server_round:04d}"


def folder_round(name: str) -> int | None:
    """Return the round a release folder name stands for (``round-0003`` → 3), None for any other name."""
    m = _ROUND_FOLDER.fullmatch(name)
    return int(m.group(1)) if m else None


def point_latest(run_folder: str | Path, name: str) -> None:
    """Make ``run_folder/LATEST`` name the release folder ``name`` (``shared/atomic.py``: never half, durable)."""
    if not FOLDER_NAME.fullmatch(name):
        raise ReleaseError(f"{name!r:.80} is not a release folder name")
    write_atomic(Path(run_folder) / LATEST, f"{name}\n".encode())


def latest_name(run_folder: str | Path) -> str | None:
    """Return the release folder name ``run_folder/LATEST`` holds (None: no LATEST file).

    Raises
    ------
    ReleaseError
        LATEST holds something other than one plain folder name (a path could leave the folder), or is not
        a regular file of at most ``MAX_LATEST_BYTES``.
    OSError
        LATEST exists but cannot be read.
    """
    try:
        raw = read_bounded(Path(run_folder) / LATEST, MAX_LATEST_BYTES)  # a planted FIFO is refused, not waited on
    except FileNotFoundError:
        return None
    except FileRefusedError as exc:
        raise ReleaseError(f"LATEST is not a release pointer: {exc}") from None
    name = raw.decode(errors="replace").strip()
    if not FOLDER_NAME.fullmatch(name):
        raise ReleaseError(f"{Path(run_folder) / LATEST} names {name!r:.80}, not a release folder")
    return name


def follow_latest(path: str | Path) -> Path:
    """Return ``path`` itself, or, for a run folder, the release its ``LATEST`` names."""
    name = latest_name(path)
    return Path(path) if name is None else Path(path) / name
