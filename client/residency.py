"""Unmap the model's file pages that ONNX Runtime read once at load and never reads again.

ONNX Runtime maps a model's external data file (``MAP_PRIVATE``) and keeps the mapping of every
initializer a kernel did not fully take over: ``MatMulNBits`` packs the 4-bit codes *and* their
scales into its own buffers at load, but on x86 reports only the codes as packed, so the scales
(16 MiB for SmolLM2-135M) stay mapped and resident for the life of the process though no kernel
reads them again. The pages are the kernel's page cache, clean: under memory pressure it would
reclaim them anyway. :func:`release_model_pages` drops them from this process now
(``madvise(MADV_DONTNEED)``), so its resident set is what it uses; a page read again later (an
embedding row) is mapped again from the page cache, unchanged.

Only mappings of files inside the model's folder, private, and with no anonymous page (no page
this process ever wrote: ``Anonymous: 0 kB`` in ``/proc/self/smaps``) are dropped: a dropped page
can only come back as the file's own bytes, which a clean page already is. Linux only; elsewhere,
or if ``/proc/self/smaps`` cannot be read, nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MADV_DONTNEED = 4  # Linux, every architecture
SMAPS = Path("/proc/self/smaps")
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) [0-9a-f]+ \S+ \d+\s*(.*)$")


@dataclass
class Mapping:
    """One mapping of ``/proc/self/smaps``: its address range, permissions, file and page counts (KiB)."""

    start: int
    end: int
    perms: str
    path: str
    rss_kib: int = 0
    anonymous_kib: int = -1  # unknown until its line is read: never dropped without it


def mappings(smaps: str) -> list[Mapping]:
    """Parse the text of ``/proc/<pid>/smaps``; lines it does not know are skipped."""
    found: list[Mapping] = []
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header:
            start, end, perms, path = header.groups()
            found.append(Mapping(int(start, 16), int(end, 16), perms, path))
            continue
        key, _, value = line.partition(":")
        if found and key in ("Rss", "Anonymous"):
            words = value.split()
            kib = int(words[0]) if words and words[0].isdigit() else -1
            if key == "Rss":
                found[-1].rss_kib = kib
            else:
                found[-1].anonymous_kib = kib
    return found


def droppable(mapping: Mapping, folder: Path) -> bool:
    """Return whether ``mapping`` is private, not executable, of a file under ``folder``, resident and never written."""
    return (
        mapping.path.startswith(f"{folder}/")
        and mapping.perms[3] == "p"
        and mapping.perms[2] != "x"
        and mapping.anonymous_kib == 0
        and mapping.rss_kib > 0
    )


def release_model_pages(folder: str | Path) -> int:
    """Drop this process's clean, private mappings of files under ``folder``; return the KiB that were resident."""
    try:
        text = SMAPS.read_text()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not Linux
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    root = Path(folder).resolve()
    released = 0
    for mapping in mappings(text):
        if droppable(mapping, root) and madvise(mapping.start, mapping.end - mapping.start, MADV_DONTNEED) == 0:
            released += mapping.rss_kib
    log.debug("released %d KiB of %s's mapped pages", released, root)
    return released
