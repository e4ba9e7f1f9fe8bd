"""resume_point: the last release of an unbroken signed chain, or a refusal naming the break."""

import json
import shutil
import tracemalloc

import pytest
import torch

from server.registry import Registry
from server.resume import ResumeError, resume_point, unrecorded_rounds
from server.state import SignedRound
from shared.adapter import ADAPTER_WEIGHTS
from shared.release import MANIFEST, SIGNATURE, make_release
from shared.sign import TrustList, generate_key, load_private_key

BASE = "b" * 64


def _registry(tmp_path, run_id="run-a"):
    key = tmp_path / "server.key"
    if not key.exists():
        generate_key(key)
    return Registry(tmp_path / "releases" / run_id, key, run_id, BASE, "fedavg", b"{}")


def _trust(tmp_path):
    return TrustList.load(tmp_path / "server.key.pub")


def _state(value):
    return {"l.lora_A.weight": torch.full((2, 4), float(value)), "l.lora_B.weight": torch.full((4, 2), float(value))}


def test_no_release_yet_means_start_from_round_0(tmp_path):
    assert resume_point(tmp_path / "nothing", TrustList(), "run-a", BASE, "fedavg") is None


def test_resumes_after_the_last_round_and_the_next_release_extends_the_chain(tmp_path):
    registry = _registry(tmp_path)
    digests = [registry.publish(n, _state(n))[1].digest() for n in range(3)]
    point = resume_point(registry.folder, _trust(tmp_path), "run-a", BASE, "fedavg")
    assert point is not None and point.round == 2 and point.chain == tuple(digests)
    restarted = _registry(tmp_path)  # a new coordinator process
    restarted.resume(point.release, point.manifest)
    _, manifest = restarted.publish(3, _state(3))
    assert manifest.previous == digests[-1]
    assert resume_point(registry.folder, _trust(tmp_path), "run-a", BASE, "fedavg").round == 3


def test_a_latest_pointer_left_behind_is_repaired(tmp_path):
    registry = _registry(tmp_path)
    for n in range(2):
        registry.publish(n, _state(n))
    (registry.folder / "LATEST").write_text("round-0000\n")  # killed between the release and the pointer
    point = resume_point(registry.folder, _trust(tmp_path), "run-a", BASE, "fedavg")
    _registry(tmp_path).resume(point.release, point.manifest)
    assert (registry.folder / "LATEST").read_text().strip() == "round-0001"


def test_a_broken_chain_or_a_foreign_release_is_refused(tmp_path):
    registry = _registry(tmp_path)
    for n in range(3):
        registry.publish(n, _state(n))
    shutil.rmtree(registry.folder / "round-0001")
    with pytest.raises(ResumeError, match="chain is broken"):
        resume_point(registry.folder, _trust(tmp_path), "run-a", BASE, "fedavg")
    with pytest.raises(ResumeError, match="run_id is 'run-a', not 'run-b'"):
        resume_point(registry.folder, _trust(tmp_path), "run-b", BASE, "fedavg")
    other = tmp_path / "other"
    generate_key(other / "k")
    with pytest.raises(ResumeError, match="not in the trust list"):
        resume_point(registry.folder, TrustList.load(other / "k.pub"), "run-a", BASE, "fedavg")


def _signed(run_id, number, digest):
    return SignedRound(run_id, number, digest, "k", "2026-11-24T00:00:00Z", f"round-{number:04d}", True)


def test_the_store_and_the_releases_must_agree_on_the_last_signed_round(tmp_path):
    registry = _registry(tmp_path)
    digests = [registry.publish(n, _state(n))[1].digest() for n in range(3)]
    point = resume_point(registry.folder, _trust(tmp_path), "run-a", BASE, "fedavg")
    db = tmp_path / "state.sqlite"
    assert list(unrecorded_rounds(point, _signed("run-a", 2, digests[2]), db)) == []  # in step: nothing to add
    # killed after round 2's release was written, before the round log committed it: recorded, not re-signed
    assert list(unrecorded_rounds(point, _signed("run-a", 1, digests[1]), db)) == [2]
    assert list(unrecorded_rounds(point, None, db)) == [0, 1, 2]  # a store that never saw the run
    assert list(unrecorded_rounds(None, None, db)) == []  # a new run
    with pytest.raises(ResumeError, match=r"signed up to round 3, but its release folder holds only up to round 2"):
        unrecorded_rounds(point, _signed("run-a", 3, "f" * 64), db)
    with pytest.raises(ResumeError, match=r"signed up to round 0, but its release folder holds none"):
        unrecorded_rounds(None, _signed("run-a", 0, digests[0]), db)
    disagree = rf"round 1 of run run-a as manifest {'e' * 16}, but its release folder holds the signed release"
    with pytest.raises(ResumeError, match=disagree):
        unrecorded_rounds(point, _signed("run-a", 1, "e" * 64), db)


def test_a_round_that_published_nothing_does_not_break_the_resume(tmp_path):
    registry = _registry(tmp_path)
    manifests = {n: registry.publish(n, _state(n))[1] for n in (0, 1, 3)}  # round 2's aggregate was refused
    assert manifests[3].previous == manifests[1].digest()  # each release names the previous *published* one
    point = resume_point(registry.folder, _trust(tmp_path), "run-a", BASE, "fedavg")
    assert point is not None and point.round == 3
    assert point.chain == tuple(m.digest() for m in manifests.values())
    assert point.manifest_of(2) is None and point.manifest_of(3) == manifests[3]
    db = tmp_path / "state.sqlite"
    assert unrecorded_rounds(point, _signed("run-a", 3, manifests[3].digest()), db) == []
    # killed after round 3's release was written, before the store recorded it: round 3 is recorded, as round 3
    assert unrecorded_rounds(point, _signed("run-a", 1, manifests[1].digest()), db) == [3]
    assert unrecorded_rounds(point, None, db) == [0, 1, 3]
    with pytest.raises(ResumeError, match="holds no release for that round"):  # the store and the disk disagree
        unrecorded_rounds(point, _signed("run-a", 2, "f" * 64), db)


def test_a_forged_round_folder_is_refused_before_the_sizes_its_manifest_claims_are_read(tmp_path):
    registry = _registry(tmp_path)
    registry.publish(0, _state(0))
    generate_key(tmp_path / "attacker.key")
    size = 512 << 20  # a sparse file: a few KB on disk, 512 MiB if read
    release, _ = make_release(
        {ADAPTER_WEIGHTS: b""}, kind="adapter", run_id="run-a", round=1, base_digest=BASE, method="fedavg",
        key=load_private_key(tmp_path / "attacker.key"), previous=registry.latest[1].digest(),
    )  # fmt: skip
    manifest = json.loads(release.manifest_bytes)
    manifest["sizes"][ADAPTER_WEIGHTS] = size
    folder = registry.folder / "round-0001"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, separators=(",", ":")))
    (folder / SIGNATURE).write_bytes(release.signature)
    with open(folder / ADAPTER_WEIGHTS, "wb") as f:
        f.truncate(size)
    tracemalloc.start()
    try:
        with pytest.raises(ResumeError, match="not in the trust list"):
            resume_point(registry.folder, _trust(tmp_path), "run-a", BASE, "fedavg")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak:,} bytes allocated before the forged signature was refused"
