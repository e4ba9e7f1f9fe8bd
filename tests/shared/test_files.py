"""Bounded reads of files someone else may have put there (shared/files.py), and the readers built on them."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.errors import ReleaseError
from shared.files import FileRefusedError, read_bounded
from shared.layout import LATEST, latest_name
from shared.manifest import MAX_MANIFEST_BYTES, read_manifest, sha256_file
from shared.release import MANIFEST, SIGNATURE, Release, make_release, read_release, write_release
from tests.fifo import outcome_without_blocking

KEY = Ed25519PrivateKey.generate()


def _peak_allocation(call: Callable[[], object]) -> tuple[object, int]:
    """Run ``call``; return what it returned or raised, and the most Python allocated meanwhile (bytes)."""
    tracemalloc.start()
    try:
        try:
            outcome: object = call()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_regular_file_within_its_bound_is_read_whole(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_bounded(path, 100) == b"x" * 100
    assert read_bounded(path, 1000) == b"x" * 100


def test_one_byte_over_the_bound_is_refused(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 101)
    with pytest.raises(FileRefusedError, match="larger than 100 bytes"):
        read_bounded(path, 100)


def test_a_large_file_is_refused_without_being_read(tmp_path):
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.truncate(512 << 20)  # sparse: 512 MiB of zeros that take no disk
    refused, peak = _peak_allocation(lambda: read_bounded(path, 1024))
    assert isinstance(refused, FileRefusedError) and "larger than" in str(refused)
    assert peak < 1 << 20, f"refusing a 512 MiB file allocated {peak:,} bytes"


def test_what_is_allocated_is_the_files_size_not_the_bound(tmp_path):
    path = tmp_path / "small"
    path.write_bytes(b"x" * 20)
    data, peak = _peak_allocation(lambda: read_bounded(path, 2 << 30))  # a release file's bound: 2 GiB
    assert data == b"x" * 20
    assert peak < 1 << 20, f"reading 20 bytes under a 2 GiB bound allocated {peak:,} bytes"


def test_a_file_that_grows_past_its_bound_after_fstat_is_refused_not_cut(tmp_path, monkeypatch):
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 110)
    real_fstat = os.fstat

    def fstat_before_it_grew(fd):  # the size fstat saw before a writer appended 100 bytes
        info = real_fstat(fd)
        return os.stat_result((*info[:6], 10, *info[7:10]))

    monkeypatch.setattr(os, "fstat", fstat_before_it_grew)
    with pytest.raises(FileRefusedError, match="larger than 50 bytes"):
        read_bounded(path, 50)
    assert read_bounded(path, 200) == b"x" * 110  # within the bound: read whole, not cut at the old size


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    error = outcome_without_blocking(lambda: read_bounded(fifo, 100), fifo)
    assert isinstance(error, FileRefusedError) and "not a regular file" in str(error)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(FileRefusedError, match="not a regular file"):
        read_bounded(tmp_path, 100)


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_bounded(tmp_path / "missing", 100)


def test_a_link_is_followed_unless_refused(tmp_path):
    (tmp_path / "target").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert read_bounded(tmp_path / "link", 100) == b"data"
    with pytest.raises(FileRefusedError, match="symbolic link"):
        read_bounded(tmp_path / "link", 100, follow_links=False)


def test_a_private_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(b"secret")
    path.chmod(0o640)
    with pytest.raises(FileRefusedError, match="chmod 600"):
        read_bounded(path, 100, private=True)
    path.chmod(0o600)
    assert read_bounded(path, 100, private=True) == b"secret"


def _release_folder(tmp_path: Path, weights: bytes = b"w") -> Path:
    """Write a signed adapter release (config + weights) as the device's cache holds it."""
    release, _ = make_release(
        {"adapter_config.json": b"{}", "adapter_model.safetensors": weights},
        kind="adapter", run_id="run", round=1, base_digest="b" * 64, method="fedavg", key=KEY,
    )  # fmt: skip
    return write_release(release, tmp_path / "round-0001")


@pytest.mark.parametrize("name", [MANIFEST, SIGNATURE, "adapter_model.safetensors"])
def test_a_release_with_a_fifo_in_place_of_a_file_is_refused_not_waited_on(tmp_path, name):
    folder = _release_folder(tmp_path)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    error = outcome_without_blocking(lambda: read_release(folder), folder / name)
    assert isinstance(error, ReleaseError) and "not a regular file" in str(error)


def test_an_oversized_manifest_in_a_release_is_refused_without_being_read(tmp_path):
    folder = _release_folder(tmp_path)
    with open(folder / MANIFEST, "wb") as f:
        f.truncate(512 << 20)
    refused, peak = _peak_allocation(lambda: read_release(folder))
    assert isinstance(refused, ReleaseError) and f"larger than {MAX_MANIFEST_BYTES:,} bytes" in str(refused)
    assert peak < 1 << 20, f"refusing a 512 MiB manifest allocated {peak:,} bytes"


def test_reading_a_valid_release_allocates_about_its_size(tmp_path):
    folder = _release_folder(tmp_path, b"w" * (4 << 20))
    release, peak = _peak_allocation(lambda: read_release(folder))
    assert isinstance(release, Release) and len(release.files["adapter_model.safetensors"]) == 4 << 20
    assert peak < 6 << 20, f"reading a 4 MiB release allocated {peak:,} bytes"


def test_a_file_the_manifest_does_not_list_is_refused_before_it_is_read(tmp_path):
    folder = _release_folder(tmp_path)
    with open(folder / "junk.bin", "wb") as f:
        f.truncate(1900 << 20)  # sparse 1.9 GiB: read whole, it was a MemoryError on a small device
    refused, peak = _peak_allocation(lambda: read_release(folder))
    assert isinstance(refused, ReleaseError) and "unexpected ['junk.bin']" in str(refused)
    assert peak < 1 << 20, f"refusing an unlisted 1.9 GiB file allocated {peak:,} bytes"


def test_a_listed_file_larger_than_its_signed_size_is_refused_unread(tmp_path):
    folder = _release_folder(tmp_path)
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.truncate(1900 << 20)
    with pytest.raises(ReleaseError, match="larger than 1 bytes"):
        read_release(folder)


def test_a_release_missing_its_signature_names_it(tmp_path):
    folder = _release_folder(tmp_path)
    (folder / SIGNATURE).unlink()
    with pytest.raises(ReleaseError, match=f"not a release: {SIGNATURE} is missing"):
        read_release(folder)


def test_a_release_file_that_is_a_link_is_refused(tmp_path):
    folder = _release_folder(tmp_path)
    (tmp_path / "elsewhere").write_bytes(b"w")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ReleaseError, match="symbolic link"):
        read_release(folder)


def test_latest_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / LATEST)
    error = outcome_without_blocking(lambda: latest_name(tmp_path), tmp_path / LATEST)
    assert isinstance(error, ReleaseError) and "not a regular file" in str(error)


def test_an_oversized_latest_is_refused(tmp_path):
    (tmp_path / LATEST).write_bytes(b"round-0001" + b" " * 1000)
    with pytest.raises(ReleaseError, match="larger than"):
        latest_name(tmp_path)


def test_a_manifest_read_for_comparison_is_bounded_and_never_waited_on(tmp_path):
    os.mkfifo(tmp_path / MANIFEST)
    error = outcome_without_blocking(lambda: read_manifest(tmp_path / MANIFEST), tmp_path / MANIFEST)
    assert isinstance(error, FileRefusedError)


def test_hashing_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "object"
    os.mkfifo(fifo)  # swapped in for a cached object between its type check and its hash
    error = outcome_without_blocking(lambda: sha256_file(fifo), fifo)
    assert isinstance(error, FileRefusedError) and "not a regular file" in str(error)
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == hashlib.sha256(b"abc").hexdigest()
