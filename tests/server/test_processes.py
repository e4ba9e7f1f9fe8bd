"""The Flower processes we start run on mimalloc (where installed), unless the operator chose otherwise."""

import subprocess
import sys

import pytest

from server.processes import ALLOCATOR, flower_env, mimalloc_library, with_allocator

MAPS = "import os; print(open('/proc/self/maps').read()); print('PURGE', os.environ.get('MIMALLOC_PURGE_DELAY'))"


def _mapped(env):
    """What a Python process started with ``env`` has mapped, and its mimalloc purge delay."""
    return subprocess.run([sys.executable, "-c", MAPS], env=env, capture_output=True, text=True, check=True).stdout


def test_a_flower_process_started_here_allocates_with_mimalloc_and_keeps_its_pages(tmp_path, monkeypatch):
    assert mimalloc_library() is not None  # fleetlora[device] (and so [sim], [dev]) installs cmeel-mimalloc
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(ALLOCATOR, raising=False)
    maps = _mapped(flower_env(tmp_path))
    assert "libmimalloc" in maps
    assert "PURGE -1" in maps  # freed pages stay: a training step faults them in again otherwise


def test_the_operators_allocator_choice_is_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(ALLOCATOR, "glibc")
    assert "libmimalloc" not in _mapped(flower_env(tmp_path))
    own = {"LD_PRELOAD": "/opt/own/libjemalloc.so.2"}
    assert with_allocator(own)["LD_PRELOAD"] == own["LD_PRELOAD"]  # theirs, alone: two allocators never mix
    with pytest.raises(ValueError, match="FLEETLORA_ALLOCATOR='tcmalloc': use mimalloc or glibc"):
        with_allocator({ALLOCATOR: "tcmalloc"})
