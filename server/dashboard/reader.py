"""The dashboard's handle on a state store: opened read-only on first use, retried until it opens.

A dashboard often starts before its store is usable: ``make demo`` serves it before the
coordinator has created the file, and a store left by an older fleetlora is at an older schema
until the next coordinator migrates it. Rather than create or migrate the file itself (the
dashboard never writes), it answers each request that needs the store with the reason it cannot
be read yet (``StateStoreError``, HTTP 503) and tries to open it again on the next one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection

from server.state import StateStore, StateStoreError


class StoreReader:
    """Read-only access to the state store at ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        self._store: StateStore | None = None
        self._lock = threading.Lock()

    def problem(self) -> str | None:
        """Return why the store cannot be read now, or None if it can."""
        try:
            with self.read():
                return None
        except StateStoreError as exc:
            return str(exc)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """Yield a read-only connection (one consistent snapshot).

        Raises
        ------
        StateStoreError
            If the store is missing, not a state store, or at another schema revision.
        """
        with self._open().read() as conn:
            yield conn

    def close(self) -> None:
        """Close the store's connections (it is opened again on the next read)."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def _open(self) -> StateStore:
        with self._lock:
            if self._store is None:
                self._store = StateStore(self.path, read_only=True)
            return self._store
