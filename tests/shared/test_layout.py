"""The run-folder layout: LATEST names one release folder of its run, never a path out of it."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.errors import ReleaseError
from shared.layout import follow_latest, point_latest
from shared.release import make_release, read_release, verify_release, write_release
from shared.sign import TrustList

BASE = "b" * 64
KEY = Ed25519PrivateKey.generate()


def _trust(*keys):
    return TrustList.of(*(k.public_key() for k in keys))


def _release(round):
    return make_release(
        {"f": bytes([round])}, kind="adapter", run_id="run-1", round=round, base_digest=BASE, method="fedavg", key=KEY
    )


def test_latest_names_one_release_folder_of_its_run(tmp_path):
    for n in (1, 2):
        write_release(_release(n)[0], tmp_path / f"round-{n:04d}")
    assert follow_latest(tmp_path / "round-0001") == tmp_path / "round-0001"  # a release folder is itself
    assert follow_latest(tmp_path) == tmp_path  # no LATEST yet: the folder as given (read_release refuses it)
    point_latest(tmp_path, "round-0002")
    assert verify_release(read_release(follow_latest(tmp_path)), _trust(KEY), BASE).round == 2
    for bad in ("../round-0001", "/etc", ""):
        with pytest.raises(ReleaseError, match="not a release folder name"):
            point_latest(tmp_path, bad)
        (tmp_path / "LATEST").write_text(bad + "\n")  # written by hand or by someone else
        with pytest.raises(ReleaseError, match="not a release folder"):
            follow_latest(tmp_path)
