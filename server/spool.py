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
        if self._record is None:  # one reusable record buffer: each tensor is converted straight into it
            self._record = torch.empty(self.record_bytes // self._itemsize, dtype=self.dtype)
        for key, offset in self._offsets.items():
            start = offset // self._itemsize
            flat = state[key].detach().reshape(-1)
            self._record[start : start + flat.numel()].copy_(flat)
        data = memoryview(self._record.numpy().view(np.uint8))  # type: ignore[arg-type]  # the bytes, no copy
        written = os.pwrite(self._fd, data, len(self) * self.record_bytes)
        if written != len(data):
            raise OSError(f"short write to the spool in {self.folder}: {written} of {len(data)} bytes")
        self.weights.append(float(weight))

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Return ``key`` of records ``[start, stop)`` as one fp32 tensor, (stop - start, *shape)."""
        shape = self.shapes[key]
        count = stop - start
        out = np.empty((count, *shape), dtype=self._np)
        size = out[0].nbytes if count else 0
        for j, i in enumerate(range(start, stop)):
            got = os.preadv(self._fd, [memoryview(out[j]).cast("B")], i * self.record_bytes + self._offsets[key])
            if got != size:
                raise OSError(f"short read from the spool in {self.folder}: {got} of {size} bytes")
        return torch.from_numpy(out).float()

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
