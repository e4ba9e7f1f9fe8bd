"""The release registry: one coordinator per run folder, and every release written durably."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from server.registry import LOCK_FILE, Registry, RunFolderLockedError
from server.resume import resume_point
from shared.release import MANIFEST, read_release, verify_release
from shared.release_records import links_config, links_from_config
from shared.replay import AcceptedReleases
from shared.sign import TrustList, generate_key
from tests.fifo import outcome_without_blocking

BASE = "b" * 64
ROOT = Path(__file__).resolve().parents[2]
STATE = {"l.lora_A.weight": torch.ones(2, 4), "l.lora_B.weight": torch.zeros(4, 2)}


@pytest.fixture
def key(tmp_path):
    generate_key(tmp_path / "server.key")
    return tmp_path / "server.key"


def _registry(folder, key):
    return Registry(folder, key, "run-a", BASE, "fedavg", b"{}")


def _coordinator(folder, key):
    """Start another process that holds a Registry of ``folder`` until it is killed; return it once it holds it."""
    code = textwrap.dedent(f"""
        import sys
        from server.registry import Registry
        registry = Registry({str(folder)!r}, {str(key)!r}, "run-a", {BASE!r}, "fedavg", b"{{}}")
        print("holding", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"  # readline returns at exit too
    return proc


def test_a_second_coordinator_of_a_run_folder_fails_at_once_and_names_the_first(tmp_path, key):
    folder = tmp_path / "releases" / "run-a"
    first = _coordinator(folder, key)
    try:
        with pytest.raises(RunFolderLockedError, match=rf"held by another coordinator \(pid {first.pid} on .*run-a"):
            _registry(folder, key)
        assert not list(folder.glob("round-*"))  # nothing was signed by the second one
    finally:
        os.kill(first.pid, signal.SIGKILL)  # a coordinator killed at any moment
        first.wait(timeout=60)
    registry = _registry(folder, key)  # the kernel dropped the dead one's lock: a restart proceeds
    registry.publish(0, STATE)
    assert verify_release(read_release(folder / "round-0000"), TrustList.load(f"{key}.pub"), BASE).round == 0
    registry.close()


@pytest.mark.parametrize("planted", ["link", "fifo"])
def test_a_link_or_fifo_planted_as_the_run_folders_lock_is_refused_and_nothing_written(tmp_path, key, planted):
    folder = tmp_path / "releases" / "run-a"
    folder.mkdir(parents=True)
    victim = tmp_path / "operator-notes.txt"
    victim.write_text("precious\n")
    if planted == "link":
        (folder / LOCK_FILE).symlink_to(victim)  # the lock's holder line would be written through it
    else:
        os.mkfifo(folder / LOCK_FILE)
    refused = outcome_without_blocking(lambda: _registry(folder, key), folder / LOCK_FILE)
    assert isinstance(refused, RunFolderLockedError) and "not a regular file" in str(refused), refused
    assert victim.read_text() == "precious\n" and not list(folder.glob("round-*"))


def test_registries_of_one_process_share_its_lock_and_release_it_when_closed(tmp_path, key):
    folder = tmp_path / "releases" / "run-a"
    first, restarted = _registry(folder, key), _registry(folder, key)  # one process: one coordinator
    first.close()
    other = subprocess.run(
        [sys.executable, "-c", f"from server.registry import Registry; Registry({str(folder)!r}, {str(key)!r}, "
         f"'run-a', {BASE!r}, 'fedavg', b'')"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert other.returncode != 0 and "RunFolderLockedError" in other.stderr  # still held by `restarted`
    restarted.close()
    free = subprocess.run(other.args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free.stderr


def test_each_release_and_latest_are_written_durably(tmp_path, key, synced):
    folder = tmp_path / "releases" / "run-a"
    registry = _registry(folder, key)
    registry.publish(0, STATE)
    staging = folder / "round-0000.partial"
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json", "manifest.sig", "LATEST"):
        where = folder if name == "LATEST" else staging
        assert any(p.startswith(f"{where}/.{name}.") for p in synced), f"{name} was not fsynced"
    assert str(staging) in synced and str(folder) in synced  # the folders: every rename is on disk too
    assert (folder / "LATEST").read_text() == "round-0000\n"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "LATEST", "round-0000"]  # no temp file left
    registry.close()


def test_recent_links_let_a_device_that_missed_rounds_follow_the_chain(tmp_path, key):
    folder = tmp_path / "releases" / "run-a"
    registry = _registry(folder, key)
    trust = TrustList.load(f"{key}.pub")
    device = AcceptedReleases(tmp_path / "device" / "accepted.json")
    for n in (0, 1, 3, 4):  # round 2 published nothing
        release, _ = registry.publish(n, {k: v + n for k, v in STATE.items()})
        if n == 0:
            device.accept(verify_release(release, trust, BASE, device))  # then the device is away for rounds 1-3
    links = registry.recent_links(8)
    assert [link.manifest for link in links] == [(folder / f"round-{n:04d}" / MANIFEST).read_bytes() for n in (3, 1, 0)]
    assert len(registry.recent_links(2)) == 2
    sent = links_from_config(links_config(links))  # what the round message carries
    device.accept(verify_release(release, trust, BASE, device, sent))
    assert device.runs["adapter:run-a"]["round"] == 4
    registry.close()
    restarted = _registry(folder, key)  # a resumed coordinator reads them from the run folder
    point = resume_point(folder, trust, "run-a", BASE, "fedavg")
    restarted.resume(point.release, point.manifest)
    assert restarted.recent_links(8) == links
    restarted.close()
