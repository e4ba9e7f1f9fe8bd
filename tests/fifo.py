"""Calling code that reads a FIFO planted in a file's place: it must return (refuse), not wait for a writer."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

WAIT_S = 60  # a blocked open never returns; 60 s is margin for a loaded 2-core machine


def outcome_without_blocking(call: Callable[[], object], fifo: Path) -> object:
    """Run ``call`` in a thread; return what it returned or raised, or fail the test if it still waits on ``fifo``."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=WAIT_S)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer: the blocked open returns, the thread ends
        pytest.fail(f"{fifo.name}: the call waited for a writer on a FIFO")
    return outcome[0]
