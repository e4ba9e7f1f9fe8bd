"""Start and stop the Flower processes an operator runs, by PID, with every process they spawn.

Flower's long-lived processes (``flower-superlink``, ``flower-supernode``) spawn
``flower-superexec`` and per-run app processes, some in sessions of their own. Each process we
start gets a new session (its own process group), and :func:`stop_process_tree` stops the
process and every descendant it can still see, however the run ended.

**Their heap allocator is mimalloc** (Leijen, Zorn and de Moura, 2019, "Mimalloc: Free List
Sharding in Action"), preloaded from ``cmeel-mimalloc`` (``fleetlora[device]``, ``[sim]``) where it
is installed: glibc's malloc fragments under a training step's mix of tensor sizes. Measured on
SmolLM2 (4-bit base, seq 256 x batch 4, r = 8, float32, checkpointed, AMD EPYC): after the backward
pass glibc's heap held 1,040 MB with 180 MB of it in use. Peak RSS with mimalloc (BENCHMARKS.md,
"Training memory and time"): checkpointed 1,602 -> 992 MB in float32, 926 -> 849 MB in bf16; the
defaults 3,080 -> 2,137 (float32) and 1,771 -> 1,589 MB (bf16); time per step within this VM's
drift between processes (-8% to +11%). The small checkpointed settings of a tight memory budget
peak up to 53 MB higher on it, still within their budgets (``client/budget.py``). Freed pages are never
purged (``MIMALLOC_PURGE_DELAY=-1``): mimalloc's default 10 ms purge gave the pages back between
layers and faulted them in again (1.22x the time per step). An operator's own ``LD_PRELOAD`` is kept
as it is; ``FLEETLORA_ALLOCATOR=glibc`` keeps the system's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

ALLOCATOR = "FLEETLORA_ALLOCATOR"
"""``mimalloc`` (the default, where installed) or ``glibc``: the heap allocator of the Flower processes started here."""
MIMALLOC = "cmeel-mimalloc"  # the distribution whose wheel ships libmimalloc.so


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: its own home, no telemetry, no runtime installs."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        # SuperNodes spawn flower-superexec by name: the venv's bin must be on PATH
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    # Ray's coming default: it stops hiding accelerators from actors that ask for none (a CPU fleet has
    # none to hide); opting in now silences the FutureWarning it prints at every simulation's start
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env.update(extra or {})
    return with_allocator(env)


def with_allocator(env: Mapping[str, str]) -> dict[str, str]:
    """Return ``env`` with mimalloc preloaded, as the module docstring says; unchanged where it does not apply.

    Raises
    ------
    ValueError
        ``FLEETLORA_ALLOCATOR`` names neither ``mimalloc`` nor ``glibc``.
    """
    out = dict(env)
    choice = out.get(ALLOCATOR, "mimalloc")
    if choice not in ("mimalloc", "glibc"):
        raise ValueError(f"{ALLOCATOR}={choice!r}: use mimalloc or glibc")
    if choice == "glibc" or out.get("LD_PRELOAD") or not sys.platform.startswith("linux"):
        return out
    library = mimalloc_library()  # looked up only where it would be used
    if library is None:
        return out
    out["LD_PRELOAD"] = str(library)
    out.setdefault("MIMALLOC_PURGE_DELAY", "-1")
    return out


def mimalloc_library() -> Path | None:
    """Return the ``libmimalloc.so`` that ``cmeel-mimalloc`` installed here, or None (not installed)."""
    from importlib import metadata

    try:
        files = metadata.files(MIMALLOC) or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmimalloc.so"):
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return path
    return None


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: Sequence[str], env: dict[str, str], log_file: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a session of its own (a process group to stop), its output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as sink:
        return subprocess.Popen(
            list(cmd), env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_port(address: str, proc: subprocess.Popen[bytes], timeout: float, log_file: Path) -> None:
    """Wait until ``address`` accepts TCP connections; fail if ``proc`` exits or ``timeout`` passes."""
    host, port = address.rsplit(":", 1)
    name = Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}; see {log_file}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not listen on {address} within {timeout:.0f} s; see {log_file}")


def tree(pid: int) -> list[psutil.Process]:
    """Return the process ``pid``, its living descendants and the rest of its process group.

    A descendant whose parent died is re-parented to init and no longer looks like one; the
    process group we started ``pid`` in still holds it (a ServerApp left behind by its SuperExec).
    """
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(pid)
        found = {p.pid: p for p in [*root.children(recursive=True), root]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if p.pid not in found and os.getpgid(p.pid) == pid:
                found[p.pid] = p
    return list(found.values())


def signal_tree(pid: int, sig: int) -> list[psutil.Process]:
    """Send ``sig`` to the process ``pid``, its process group and every descendant; return who got it."""
    procs = tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the group we started it in (a no-op if it is not a group leader)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    return procs


def stop_pid(pid: int, grace: float = 15.0) -> None:
    """SIGTERM ``pid`` and its descendants, SIGKILL what is left after ``grace`` seconds."""
    procs = signal_tree(pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def stop_process_tree(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """Stop a process we started and every descendant (see :func:`stop_pid`), then reap it."""
    stop_pid(proc.pid, grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
