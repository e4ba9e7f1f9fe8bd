"""Reading a file that someone else may have put there: a regular file, bounded, never waited on.

A release folder, a run folder's ``LATEST``, a certificate, a state file: each can be replaced
by something else between two looks at it. :func:`read_bounded` checks what it reads on the open
descriptor itself, so the file checked is the file read:

- opened with ``O_NONBLOCK``: a FIFO (or a device) in a file's place cannot block the open, and
  is then refused as not a regular file — a plain ``open`` would wait for a writer forever;
- ``fstat`` of that descriptor: a regular file only (no ``is_file()``-then-``open`` race);
- at most ``limit + 1`` bytes are read: a larger file is refused, its size never allocated;
- ``follow_links=False`` opens with ``O_NOFOLLOW``; ``private`` refuses a file others can read.

The counterpart for writing is :func:`shared.atomic.write_atomic`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class FileRefusedError(OSError):
    """A file that is not a regular file, is larger than its bound, or is readable by others; names which."""


def read_bounded(path: str | Path, limit: int, *, follow_links: bool = True, private: bool = False) -> bytes:
    """Return the bytes of the regular file ``path``, at most ``limit`` of them.

    Raises
    ------
    FileRefusedError
        Not a regular file (a FIFO, a device, a folder; a symbolic link with ``follow_links=False``),
        more than ``limit`` bytes, or (``private``) readable by group or others.
    OSError
        The file cannot be opened (``FileNotFoundError`` for a missing one), as ``os.open`` raises it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise FileRefusedError(f"{path}: a symbolic link, not a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefusedError(f"{path}: not a regular file")
        if private and mode & 0o077:
            raise FileRefusedError(f"{path}: other users can read it; chmod 600 it")
        f = os.fdopen(fd, "rb")  # owns the descriptor from here (a folder's could not be wrapped)
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileRefusedError(f"{path}: larger than {limit:,} bytes")
    return data
