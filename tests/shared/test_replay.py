"""The replay store: replays, rollbacks and forks are refused, and a damaged store refuses everything."""

import json
import multiprocessing
import os

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.chain import SignedManifest
from shared.errors import ReleaseError
from shared.release import make_release, verify_release
from shared.replay import AcceptedReleases, ReplayStoreError
from shared.sign import TrustList
from shared.tensors import save_tensors
from tests.fifo import outcome_without_blocking

BASE = "b" * 64
KEY = Ed25519PrivateKey.generate()
TRUST = TrustList.of(KEY.public_key())
FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": save_tensors({"w": torch.ones(2, 2)})}


def _release(round=1, previous="", files=FILES, run_id="run-1"):
    return make_release(
        files, kind="adapter", run_id=run_id, round=round, base_digest=BASE, method="fedavg", key=KEY, previous=previous
    )


def _accept(accepted, release):
    accepted.accept(verify_release(release, TRUST, BASE, accepted))


def test_replays_rollbacks_and_forks_are_refused(tmp_path):
    accepted = AcceptedReleases(tmp_path / "accepted.json")
    r1, m1 = _release(round=1)
    _accept(accepted, r1)
    verify_release(r1, TRUST, BASE, accepted)  # the release in use, delivered again
    r1b, _ = _release(round=1, files={**FILES, "adapter_config.json": b'{"r": 2}'})
    with pytest.raises(ReleaseError, match="replay: round 1 of run run-1 is not newer than the accepted round 1"):
        verify_release(r1b, TRUST, BASE, AcceptedReleases(tmp_path / "accepted.json"))  # survives a restart
    fork, _ = _release(round=2, previous="e" * 64)
    with pytest.raises(ReleaseError, match="chain broken"):
        verify_release(fork, TRUST, BASE, accepted)
    r2, m2 = _release(round=2, previous=m1.digest())
    _accept(accepted, r2)
    with pytest.raises(ReleaseError, match="replay: round 1 .* accepted round 2"):
        verify_release(r1, TRUST, BASE, accepted)  # rollback to an older, validly signed round
    other_run, _ = _release(round=1, run_id="run-2")
    verify_release(other_run, TRUST, BASE, accepted)  # each run has its own history


def _round_3_accepted(path):
    accepted = AcceptedReleases(path)
    previous = ""
    for n in (1, 2, 3):
        release, manifest = _release(round=n, previous=previous)
        _accept(accepted, release)
        previous = manifest.digest()
    return accepted


DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "garbage": lambda p: p.write_bytes(os.urandom(64) + b"\xff"),
    "not utf-8": lambda p: p.write_bytes(b'{"adapter:run-1": "\xff"}'),
    "a list": lambda p: p.write_text("[]"),
    "a round as text": lambda p: p.write_text(json.dumps({"adapter:run-1": {"round": "3", "digest": "a" * 64}})),
    "a bool round": lambda p: p.write_text(json.dumps({"adapter:run-1": {"round": True, "digest": "a" * 64}})),
    "a record as a number": lambda p: p.write_text(json.dumps({"adapter:run-1": 3})),
    "an unknown field": lambda p: p.write_text(json.dumps({"adapter:run-1": {"round": 3, "digest": "a" * 64, "x": 1}})),
    "a bad key": lambda p: p.write_text(json.dumps({"run-1": {"round": 3, "digest": "a" * 64}})),
    "a bad time": lambda p: p.write_text(
        json.dumps({"adapter:run-1": {"round": 3, "digest": "a" * 64, "created": "9"}})
    ),
    "a directory": lambda p: (p.unlink(), p.mkdir()),
    "a secure round as text": lambda p: p.write_text(json.dumps({"secure:run-1": {"round": "3"}})),
    "a secure record with a digest": lambda p: p.write_text(
        json.dumps({"secure:run-1": {"round": 3, "digest": "a" * 64}})
    ),
    "a negative secure round": lambda p: p.write_text(json.dumps({"secure:run-1": {"round": -1}})),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_store_refuses_every_release_and_says_what_to_do(tmp_path, damage):
    path = tmp_path / "accepted.json"
    _round_3_accepted(path)
    DAMAGE[damage](path)
    r1, _ = _release(round=1)
    with pytest.raises(ReplayStoreError, match="refuses every release until an operator repairs it") as refused:
        verify_release(r1, TRUST, BASE, AcceptedReleases(path))  # never "round 1 after round 3"
    assert str(path) in str(refused.value) and "restore it from a backup, or delete it" in str(refused.value)
    assert isinstance(refused.value, ReleaseError)  # every caller that refuses a bad release refuses this too


def test_a_secure_round_is_masked_once_in_increasing_rounds_and_a_damaged_store_refuses_it(tmp_path):
    path = tmp_path / "accepted.json"
    accepted = _round_3_accepted(path)
    accepted.mask_once("run-1", 5)
    for again in (5, 4):
        with pytest.raises(ReleaseError, match=f"secure round {again} of run run-1: this device already masked"):
            AcceptedReleases(path).mask_once("run-1", again)
    AcceptedReleases(path).mask_once("run-2", 1)  # per run
    AcceptedReleases(path).mask_once("run-1", 6)
    assert json.loads(path.read_text())["secure:run-1"] == {"round": 6}
    assert AcceptedReleases(path).accepted_round("adapter", "run-1") == 3  # the release record is untouched
    path.write_text(json.dumps({"secure:run-1": {"round": "6"}}))
    with pytest.raises(ReplayStoreError, match="refuses every release"):  # never read as "masked nothing yet"
        AcceptedReleases(path).mask_once("run-1", 1)


def test_a_missing_store_is_a_device_that_accepted_nothing_yet(tmp_path):
    accepted = AcceptedReleases(tmp_path / "state" / "accepted.json")
    assert accepted.runs == {}
    _accept(accepted, _release(round=4)[0])  # trusted on first use
    assert AcceptedReleases(tmp_path / "state" / "accepted.json").runs["adapter:run-1"]["round"] == 4


def test_records_from_before_creation_times_were_kept_still_load(tmp_path):
    path = tmp_path / "accepted.json"
    path.write_text(json.dumps({"adapter:run-1": {"round": 3, "digest": "a" * 64}}))
    assert AcceptedReleases(path).runs["adapter:run-1"]["round"] == 3


def test_a_record_that_cannot_be_written_refuses_the_release(tmp_path):
    (tmp_path / "file").write_text("")
    accepted = AcceptedReleases(tmp_path / "file" / "accepted.json")  # its folder is a file
    with pytest.raises(ReplayStoreError, match="cannot be written"):
        _accept(accepted, _release(round=1)[0])
    assert accepted.runs == {}


def test_each_record_is_written_durably(tmp_path, synced):
    _accept(AcceptedReleases(tmp_path / "accepted.json"), _release(round=1)[0])
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the temp file's bytes, then the folder's rename
    assert sorted(os.listdir(tmp_path)) == ["accepted.json", "accepted.json.lock"]  # no temp file left (the lock
    # file stays: unlinking it would let two processes hold locks on two different files)


def test_two_processes_sharing_the_store_do_not_erase_each_others_records(tmp_path):
    path = tmp_path / "accepted.json"
    infer_session = AcceptedReleases(path)  # a long `fleetlora infer` session, loaded before the fetch below
    fetch = _round_3_accepted(path)  # `fleetlora fetch` accepts rounds 1-3 of run-1 meanwhile
    _accept(infer_session, _release(round=1, run_id="run-2")[0])  # the session records another run
    r1, _ = _release(round=1)
    with pytest.raises(ReleaseError, match="replay: round 1 of run run-1 is not newer than the accepted round 3"):
        verify_release(r1, TRUST, BASE, AcceptedReleases(path))  # run-1's record survived the session's write
    assert fetch.runs["adapter:run-1"]["round"] == 3


def test_a_check_sees_what_another_process_accepted_since(tmp_path):
    path = tmp_path / "accepted.json"
    stale = AcceptedReleases(path)  # read while the store was empty
    _round_3_accepted(path)
    r1, _ = _release(round=1)
    with pytest.raises(ReleaseError, match="replay: round 1 .* accepted round 3"):
        verify_release(r1, TRUST, BASE, stale)  # not "trusted on first use" from a stale, empty view


def test_an_accept_after_another_process_accepted_a_newer_round_is_refused(tmp_path):
    path = tmp_path / "accepted.json"
    slow = AcceptedReleases(path)
    r1, m1 = _release(round=1)
    manifest = verify_release(r1, TRUST, BASE, slow)  # checked: nothing accepted yet
    _round_3_accepted(path)  # another process accepts rounds 1-3 before the slow one records round 1
    with pytest.raises(ReleaseError, match="changed after round 1 was checked: .* left round 3"):
        slow.accept(manifest)
    assert AcceptedReleases(path).runs["adapter:run-1"]["round"] == 3


def test_a_fifo_in_place_of_the_lock_is_refused_not_waited_on(tmp_path):
    path = tmp_path / "accepted.json"
    os.mkfifo(tmp_path / "accepted.json.lock")
    refused = outcome_without_blocking(
        lambda: _accept(AcceptedReleases(path), _release(round=1)[0]), path.with_name("accepted.json.lock")
    )
    assert isinstance(refused, ReplayStoreError) and "not a regular file" in str(refused)


def test_an_accept_after_another_process_took_a_fork_is_refused(tmp_path):
    path = tmp_path / "accepted.json"
    r1, m1 = _release(round=1)
    _accept(AcceptedReleases(path), r1)
    r2a, m2a = _release(round=2, previous=m1.digest())
    r3, _ = _release(round=3, previous=m2a.digest())
    a = AcceptedReleases(path)
    manifest = verify_release(r3, TRUST, BASE, a, [_link(r2a)])  # checked: 1 -> 2a -> 3
    r2b, _ = _release(round=2, previous=m1.digest(), files={**FILES, "adapter_config.json": b'{"r": 2}'})
    _accept(AcceptedReleases(path), r2b)  # another process takes 2b, a second round 2
    with pytest.raises(ReleaseError, match="changed after round 3 was checked"):
        a.accept(manifest)  # round 3 does not lead back to 2b: checked now, it is refused as off the chain
    with pytest.raises(ReleaseError):  # checked again against 2b: refused (off its chain, and older than it)
        verify_release(r3, TRUST, BASE, a, [_link(r2a)])


def _link(release):
    return SignedManifest(release.manifest_bytes, release.signature)


def _accept_runs(path, first):
    store = AcceptedReleases(path)
    for n in range(first, first + 40):
        _accept(store, _release(round=1, run_id=f"run-{n}")[0])


def test_two_processes_accepting_at_once_keep_every_record(tmp_path):
    path = tmp_path / "accepted.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_accept_runs, args=(path, first)) for first in (0, 100)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(AcceptedReleases(path).runs) == 80  # without the lock, each write-back drops the other's records


def test_a_release_this_store_never_checked_is_not_recorded(tmp_path):
    path = tmp_path / "accepted.json"
    r1, _ = _release(round=1)
    manifest = verify_release(r1, TRUST, BASE, AcceptedReleases(path))  # checked by another store object
    with pytest.raises(ReleaseError, match="was not checked against"):
        AcceptedReleases(path).accept(manifest)
    assert not path.exists()  # nothing recorded
