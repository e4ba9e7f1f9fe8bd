"""The coordinator's heartbeat: while a run is open it writes ``runs.heard`` every few seconds.

A run the store shows as unfinished may be running, or its coordinator may have been killed,
crashed, or lost Ray before the first round: only a sign of life tells them apart. Rounds can
legitimately stay silent for a whole ``round-timeout`` (a slow device), so the rounds' own
timestamps cannot. The dashboard calls a run *stopped* when it has not been heard from for
:data:`STALE_S` (:func:`run_state`); a resumed coordinator beats again and the run is running.
"""

from __future__ import annotations

import logging
import threading
import time

from server.state.store import StateStore

log = logging.getLogger(__name__)
EVERY_S = 15.0
STALE_S = 4 * EVERY_S  # three missed beats and a margin for a busy machine


class Heartbeat:
    """Write ``store.heard(run_id)`` now and then every ``every`` seconds until :meth:`stop`.

    A failed write (the file locked for longer than the store's busy timeout) is logged and the
    next beat tried: a heartbeat never stops a run.
    """

    def __init__(self, store: StateStore, run_id: str, every: float = EVERY_S) -> None:
        self.store, self.run_id, self.every = store, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {run_id}", daemon=True)

    def start(self) -> Heartbeat:
        """Beat once now, then in the background."""
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (the run finished, or is about to raise)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.every + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._beat()

    def _beat(self) -> None:
        try:
            self.store.heard(self.run_id)
        except Exception as exc:  # noqa: BLE001 - any store failure: log it, keep the run going
            log.warning("heartbeat of run %s not written (%s); trying again in %.0f s", self.run_id, exc, self.every)


def run_state(finished: float | None, heard: float | None, now: float | None = None) -> str:
    """Return ``finished``, ``running`` (heard within :data:`STALE_S`), or ``stopped`` (silent, or never heard)."""
    if finished is not None:
        return "finished"
    now = time.time() if now is None else now
    return "running" if heard is not None and now - heard <= STALE_S else "stopped"
