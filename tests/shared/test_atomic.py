"""write_atomic: the old bytes or the new ones, durably, never half a file and never a leftover."""

import os

import pytest

from shared.atomic import write_atomic


def test_a_file_is_replaced_whole_and_durably(tmp_path, synced):
    target = tmp_path / "LATEST"
    target.write_text("round-0001\n")
    write_atomic(target, b"round-0002\n")
    assert target.read_bytes() == b"round-0002\n" and os.listdir(tmp_path) == ["LATEST"]
    assert synced[0].startswith(str(tmp_path / ".LATEST.")) and synced[1] == str(tmp_path)  # file, then folder


def test_a_failed_write_keeps_the_old_bytes_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "accepted.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # fails mid-write
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["accepted.json"]


def test_a_planted_link_at_the_temp_name_is_never_followed(tmp_path, monkeypatch):
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "0" * 2 * n)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / f".LATEST.{os.getpid()}.00000000.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "LATEST", b"x")
    assert victim.read_bytes() == b"keep"
