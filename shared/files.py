"""Reading a file that someone else may have put there: a regular file, bounded, never waited on.

A release folder, a run folder's ``LATEST``, a certificate, a state file: each can be replaced
by something else between two looks at it. :func:`read_bounded` checks what it reads on the open
descriptor itself, so the file checked is the file read:

- opened with ``O_NONBLOCK``: a FIFO (or a device) in a file's place cannot block the open, and
  is then refused as not a regular file — a plain ``open`` would wait for a writer forever;
- ``fstat`` of that descriptor: a regular file only (no ``is_file()``-then-``open`` race);
- a file larger than ``limit`` (by ``fstat``, or by what a read returns if it grew) is refused; what is
  allocated is the file's size, never the bound, and never more than ``limit + 1`` bytes are read;
- ``follow_links=False`` opens with ``O_NOFOLLOW``; ``private`` refuses a file others can read.

The counterpart for writing is :func:`shared.atomic.write_atomic`.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

_CHUNK = 1 << 20
MAX_PEM_BYTES = 64 * 1024
"""A PEM key, certificate or CA bundle of a few certificates, or a token file: an operator's small file."""


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
    fd, info = open_checked(path, follow_links=follow_links)
    try:
        if private and info.st_mode & 0o077:
            raise FileRefusedError(f"{path}: other users can read it; chmod 600 it")
        if info.st_size > limit:
            raise FileRefusedError(f"{path}: larger than {limit:,} bytes")
        # os.read allocates what it is asked for: the file's size (+1 to see it grow), never the bound.
        parts = [os.read(fd, info.st_size + 1)]
        total = len(parts[0])
        step = 4096  # then an end-of-file check that allocates little, growing for a long tail
        while parts[-1] and total <= limit:  # a short read (> 2 GiB) or a file that grew since fstat
            parts.append(os.read(fd, min(step, limit + 1 - total)))
            total += len(parts[-1])
            step = min(2 * step, _CHUNK)
    finally:
        os.close(fd)
    if total > limit:
        raise FileRefusedError(f"{path}: larger than {limit:,} bytes")
    return parts[0] if total == len(parts[0]) else b"".join(parts)


def open_regular(path: str | Path, *, follow_links: bool = True) -> io.BufferedReader:
    """Open the regular file ``path`` for reading, checked as :func:`read_bounded` checks it (to stream a large one).

    Raises
    ------
    FileRefusedError
        Not a regular file (a FIFO in its place is refused, not waited on; a link with ``follow_links=False``).
    OSError
        The file cannot be opened.
    """
    return open(path, "rb", opener=lambda _, flags: open_checked(path, flags, follow_links=follow_links)[0])


def open_checked(
    path: str | Path, flags: int = os.O_RDONLY, *, follow_links: bool = True, mode: int = 0o666
) -> tuple[int, os.stat_result]:
    """Open ``path`` with ``flags`` | ``O_NONBLOCK``; return the descriptor and its ``fstat`` if it is a regular file.

    The one check behind :func:`read_bounded` and :func:`open_regular` (and the replay store's and
    the run folder's locks): a FIFO in the file's place is refused, not waited on. ``mode`` applies if ``flags``
    has ``O_CREAT``. The caller closes the descriptor; on a refusal it is closed here.

    Raises
    ------
    FileRefusedError
        Not a regular file (a symbolic link with ``follow_links=False``).
    OSError
        The file cannot be opened.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise FileRefusedError(f"{path}: a symbolic link, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefusedError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info
