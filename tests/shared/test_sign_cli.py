"""``fleetlora keys`` and ``fleetlora verify`` as a user runs them."""

import os

from shared.cli import main
from shared.release import make_release, write_release
from shared.sign import load_private_key


def test_keys_generate_show_and_verify_a_release(tmp_path, capsys):
    key_path = tmp_path / "k" / "server.key"
    assert main(["keys", "generate", str(key_path)]) == 0
    assert main(["keys", "generate", str(key_path)]) == 2  # never overwritten silently
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["keys", "show", str(key_path)]) == 0
    shown = capsys.readouterr().out
    assert shown.splitlines()[1] == (tmp_path / "k" / "server.key.pub").read_text().strip()

    release, manifest = make_release(
        {"adapter_model.safetensors": b"weights"},
        kind="adapter",
        run_id="demo-1",
        round=3,
        base_digest="b" * 64,
        method="ties",
        key=load_private_key(key_path),
    )
    folder = write_release(release, tmp_path / "round-0003")
    trust = str(key_path) + ".pub"
    assert main(["verify", str(folder), "--trust", trust, "--base", "b" * 64]) == 0
    out = capsys.readouterr().out
    assert f"OK {folder}: adapter of run demo-1, round 3, ties" in out and manifest.digest() in out

    (folder / "adapter_model.safetensors").write_bytes(b"weightz")
    assert main(["verify", str(folder), "--trust", trust]) == 1
    assert "REJECTED" in (out := capsys.readouterr().out) and "adapter_model.safetensors: SHA-256" in out

    os.chmod(key_path, 0o640)
    assert main(["keys", "show", str(key_path)]) == 2
    assert "other users can read it" in capsys.readouterr().err
