"""Crash-safe file writes: a reader, or the same program after a power loss, sees the old bytes or the new, never half.

:func:`write_atomic` writes to a temporary file in the same folder, fsyncs it, renames it over
the target and fsyncs the folder, so that the rename itself is on disk when it returns (a
rename alone can be lost with the page cache, leaving an empty or an old file).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: str | Path, data: bytes, mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync of the folder).

    The temporary file is created with ``O_EXCL | O_NOFOLLOW`` (never through a planted link)
    and ``mode`` less the umask (``0o600`` for a secret: it is never readable by others, not
    even for a moment); it is removed if anything fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (creations, renames, deletions in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
