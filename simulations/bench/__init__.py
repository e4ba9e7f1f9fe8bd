"""Benchmark harness: every registered benchmark, one table each, written to BENCHMARKS.md.

Run all of them with ``python -m simulations.bench`` (``--only NAME`` for one, ``--no-write``
to print without rewriting BENCHMARKS.md). A benchmark is a function returning one
:class:`Table` or a list of them; register it with :func:`register`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """One benchmark's result: a title, the command that reproduces it, rows, notes."""

    title: str
    command: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """Render as a Markdown section."""
        lines = [f"## {self.title}", "", f"Reproduce: `{self.command}`", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def peak_rss() -> int:
    """Return this process's peak RSS in bytes (``VmHWM``).

    Not ``getrusage``'s ``ru_maxrss``: Linux keeps that across ``execve``, so a child started by a
    benchmark that had already grown to 3 GB reported 3 GB whatever it did itself (measured).
    """
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def run_child(module: str, *args: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process (its own peak RSS); return the JSON of its last line.

    ``env``: the child's environment (default: this process's), e.g. a device's allocator (``trainer_env``).
    """
    out = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def trainer_env(allocator: str = "mimalloc") -> dict[str, str]:
    """Return this process's environment with the heap allocator a device trains on (server/processes.py)."""
    from server.processes import ALLOCATOR, with_allocator

    return with_allocator({**os.environ, ALLOCATOR: allocator})


REGISTRY: dict[str, Callable[[], Table | list[Table]]] = {}


Bench = Callable[[], "Table | list[Table]"]


def register(name: str) -> Callable[[Bench], Bench]:
    """Register the decorated benchmark under ``name``."""

    def wrap(fn: Bench) -> Bench:
        REGISTRY[name] = fn
        return fn

    return wrap


@contextlib.contextmanager
def restored_env(name: str) -> Iterator[None]:
    """Give the environment variable ``name`` back its value (or its absence) when the block ends, however."""
    previous = os.environ.get(name)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
