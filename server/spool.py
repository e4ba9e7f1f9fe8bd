"""A round's scratch file: the accepted updates' deltas on disk, read back one module at a time.

``exact`` and ``ties`` need dense (d_out, d_in) buffers per module. Holding them for every module
at once costs 0.4-2 GB at SmolLM2-135M shapes and 4-20 GB at Llama-3.2-1B shapes; holding every
update's factors instead grows with the fleet. The spool keeps the factors on disk as they are
accepted (one fixed-size record per update, written once, in the dtype they arrived in, so nothing
is lost: an fp16 wire delta stays fp16), and hands the aggregators one module's factors of a block
of updates at a time (``pread``, so the pages live in the kernel's page cache, not the process).

It is scratch, not state: nothing relies on it after a restart. It is a nameless file in the
operator's temporary directory (``TMPDIR``, or ``folder``): closed when the round ends, whether the
aggregation succeeded or raised (use it as a context manager), and freed by the kernel if the
process dies first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
DISK_RESERVE = 2 << 30  # never fill the disk: keep this many bytes free for everyone else


class SpoolFullError(ValueError):
    """Spooling one more update would exceed the spool's byte budget (or the disk's free space)."""


class Spool:
    """Fixed-size records of ``shapes`` tensors, appended once, read back by key and by block of records.

    Parameters
    ----------
    shapes
        The tensors every record holds: key -> shape (the round's uploaded keys and shapes). Records
        are laid out in the order of ``shapes``: keep a module's factors adjacent for locality.
    dtype
        Storage dtype (float16 or float32): the dtype the deltas were decoded to without loss.
    folder
        Folder (on the disk) the spool's nameless file is made in (default: the system's, ``TMPDIR``).
    max_bytes
        Byte budget; default: the folder's free space minus ``DISK_RESERVE``. Checked before each write.
    """

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        dtype: torch.dtype = torch.float16,
        folder: str | Path | None = None,
        max_bytes: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"spool dtype must be one of {sorted(map(str, DTYPES))}, got {dtype}")
        self.shapes = {k: tuple(s) for k, s in shapes.items()}
        self.dtype, self._np = dtype, DTYPES[dtype]
        self._itemsize = np.dtype(self._np).itemsize
        self._offsets: dict[str, int] = {}
        offset = 0
        for key, shape in self.shapes.items():
            self._offsets[key] = offset
            offset += int(np.prod(shape)) * self._itemsize
        self.record_bytes = offset
        self.folder = Path(folder if folder is not None else tempfile.gettempdir())
        free = shutil.disk_usage(self.folder).free - DISK_RESERVE
        self.max_bytes = min(max_bytes, free) if max_bytes is not None else free
        # no name on disk (O_TMPFILE, or unlinked at once): the kernel frees it when the process
        # ends, even killed mid-round; an error or a kill cannot leave gigabytes behind
        self._file = tempfile.TemporaryFile(prefix="fleetlora-spool-", dir=self.folder)
        self._fd = self._file.fileno()
        self.weights: list[float] = []
        self._record: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.weights)

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Append one update (exactly the spool's keys and shapes) with its weight, or raise without writing."""
        if self._file.closed:
            raise ValueError("the spool is closed: its round has ended")
        if not weight > 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        if set(state) != set(self.shapes):
            raise ValueError("update keys differ from the spool's keys")
        for key, shape in self.shapes.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} is not the expected {shape}")
        if (len(self) + 1) * self.record_bytes > self.max_bytes:
            raise SpoolFullError(
                f"spooling update {len(self) + 1} ({self.record_bytes / 1e6:.0f} MB each) would exceed the spool's "
                f"{self.max_bytes / 1e9:.1f} GB budget in {self.folder} (point TMPDIR at a larger disk)"
            )
        if self._record is None:  # one reusable record buffer, a view of it per tensor
            self._record = torch.empty(self.record_bytes // self._itemsize, dtype=self.dtype)
            for key, offset in self._offsets.items():
                start = offset // self._itemsize
                self._views.append(self._record[start : start + int(np.prod(self.shapes[key]))].view(self.shapes[key]))
        torch._foreach_copy_(
            self._views, [state[k].detach() for k in self._offsets]
        )  # one multi-tensor copy (and cast)
        data = memoryview(self._record.numpy().view(np.uint8))  # type: ignore[arg-type]  # the bytes, no copy
        written = os.pwrite(self._fd, data, len(self) * self.record_bytes)
        if written != len(data):
            raise OSError(f"short write to the spool in {self.folder}: {written} of {len(data)} bytes")
        self.weights.append(float(weight))

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Return ``key`` of records ``[start, stop)`` as one fp32 tensor, (stop - start, *shape)."""
        return self.read_adjacent([key], start, stop)[0]

    def adjacent(self, keys: list[str]) -> bool:
        """Whether ``keys`` lie side by side, in this order, in every record."""
        ends = [self._offsets[k] + int(np.prod(self.shapes[k])) * self._itemsize for k in keys]
        return all(self._offsets[after] == end for after, end in zip(keys[1:], ends, strict=False))

    def read_adjacent(self, keys: list[str], start: int, stop: int) -> list[torch.Tensor]:
        """Return ``keys`` (adjacent in a record, in this order) of records ``[start, stop)``, fp32: a read per record.

        A module's A and B lie side by side in every record: one ``preadv`` fills both (a syscall per
        record and module instead of two: ~3 ms per SmolLM2-135M update at 420 tensors).
        """
        if not self.adjacent(keys):
            raise ValueError(f"{keys} are not adjacent, in this order, in the spool's records")
        count = stop - start
        outs = [np.empty((count, *self.shapes[k]), dtype=self._np) for k in keys]
        size = sum(o[0].nbytes for o in outs) if count else 0
        for j, i in enumerate(range(start, stop)):
            buffers = [memoryview(o[j]).cast("B") for o in outs]
            got = os.preadv(self._fd, buffers, i * self.record_bytes + self._offsets[keys[0]])
            if got != size:
                raise OSError(f"short read from the spool in {self.folder}: {got} of {size} bytes")
        return [torch.from_numpy(o).float() for o in outs]

    @property
    def nbytes(self) -> int:
        """Bytes the spool holds on disk."""
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        """Free the spool's disk space (idempotent)."""
        self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
