"""The processes a test started, told apart from everything else on the machine."""

from __future__ import annotations

import psutil


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """PID -> command line of the living processes whose environment has ``name=value`` (what a test started).

    A test gives the processes it starts a value of their own (a temp folder); their children inherit it,
    also those that leave the process tree (a detached SuperLink, Ray's daemons). Other processes on the
    machine are not looked at.
    """
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.environ().get(name) == value:
                found[p.pid] = " ".join(p.info["cmdline"] or [])
        except (psutil.Error, OSError):
            continue
    return found
