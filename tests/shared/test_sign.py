"""Signing keys and trust lists: a key file others can read, a bad trust line or an unknown key is refused."""

import os
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.files import FileRefusedError
from shared.sign import (
    MAX_TRUST_LIST_BYTES,
    SignatureError,
    TrustList,
    generate_key,
    key_id,
    load_private_key,
    public_line,
)
from tests.conftest import REPO
from tests.fifo import outcome_without_blocking


def test_key_files(tmp_path):
    path = tmp_path / "keys" / "server.key"
    key = generate_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_private_key(path).public_key().public_bytes_raw() == key.public_key().public_bytes_raw()
    trust = TrustList.load(str(path) + ".pub")
    assert list(trust.trusted) == [key_id(key.public_key())]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(SignatureError, match="server.key: other users can read it; chmod 600 it"):
        load_private_key(path)
    with pytest.raises(FileNotFoundError, match="fleetlora keys generate"):
        load_private_key(tmp_path / "nope.key")


def test_trust_list_lines(tmp_path):
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    path = tmp_path / "trust"
    path.write_text(f"# fleet keys\n{public_line(a.public_key(), 'old')}\n\n{public_line(b.public_key())}\n")
    path.write_text(path.read_text() + f"revoked {public_line(a.public_key())}\n")
    trust = TrustList.load(path)
    assert set(trust.trusted) == {key_id(a.public_key()), key_id(b.public_key())}
    assert trust.revoked == {key_id(a.public_key())}
    path.write_text("ed25519 not-base64!\n")
    with pytest.raises(SignatureError, match=r"trust:1: not a base64 32-byte Ed25519 public key"):
        TrustList.load(path)


def test_a_link_planted_at_the_keys_temp_name_never_receives_the_key(tmp_path):
    victim = tmp_path / "readable-by-all"
    victim.write_text("nothing secret\n")
    os.chmod(victim, 0o644)
    (tmp_path / "server.key.tmp").symlink_to(victim)  # the temp name the key was once written under
    generate_key(tmp_path / "server.key")
    assert victim.read_text() == "nothing secret\n"
    assert oct((tmp_path / "server.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("in_child", [False, True])
def test_a_signature_is_checked_alike_here_and_in_a_child_process(in_child):
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    trust = TrustList.of(key.public_key(), revoked=(other.public_key(),))
    trust.in_child = in_child
    signer, data = key_id(key.public_key()), b'{"kind": "adapter"}'
    trust.verify(signer, data, key.sign(data))
    for bad_data, bad_signature in ((data + b" ", key.sign(data)), (data, other.sign(data)), (b"", key.sign(data))):
        with pytest.raises(SignatureError, match=f"does not match the manifest for key {signer}"):
            trust.verify(signer, bad_data, bad_signature)
    with pytest.raises(SignatureError, match="which the trust list revokes"):
        trust.verify(key_id(other.public_key()), data, other.sign(data))
    with pytest.raises(SignatureError, match="signature is 3 bytes"):
        trust.verify(signer, data, b"abc")


def test_a_signature_check_that_cannot_run_is_a_refusal(monkeypatch):
    key = Ed25519PrivateKey.generate()
    trust = TrustList.of(key.public_key())
    trust.in_child = True
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(SignatureError, match="the signature check could not run"):
        trust.verify(key_id(key.public_key()), b"data", key.sign(b"data"))


def test_parsing_a_trust_list_imports_no_cryptography(tmp_path):
    path = tmp_path / "trust"
    path.write_text(public_line(Ed25519PrivateKey.generate().public_key()) + "\n")
    code = (
        "import sys; from shared.sign import TrustList; t = TrustList.load(sys.argv[1]); "
        "print(len(t.trusted), sorted(m for m in sys.modules if m.startswith('cryptography')))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.split() == ["1", "[]"]


def test_a_package_planted_in_the_working_directory_does_not_check_signatures(tmp_path, monkeypatch):
    planted = tmp_path / "shared"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "sign.py").write_text("import sys\nsys.exit(0)  # 'valid', whatever it is handed\n")
    monkeypatch.chdir(tmp_path)
    key = Ed25519PrivateKey.generate()
    trust = TrustList.of(key.public_key())
    trust.in_child = True
    with pytest.raises(SignatureError, match="does not match"):
        trust.verify(key_id(key.public_key()), b"data", key.sign(b"other data"))


def test_a_signature_check_that_crashes_is_a_refusal_that_says_so(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Traceback: something broke' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    key = Ed25519PrivateKey.generate()
    trust = TrustList.of(key.public_key())
    trust.in_child = True
    with pytest.raises(SignatureError, match=r"the signature check failed \(exit 1\): Traceback: something broke"):
        trust.verify(key_id(key.public_key()), b"data", key.sign(b"data"))


def test_a_fifo_or_an_oversized_file_as_key_or_trust_list_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "planted"
    os.mkfifo(fifo, 0o600)
    assert isinstance(outcome_without_blocking(lambda: TrustList.load(fifo), fifo), FileRefusedError)
    refused = outcome_without_blocking(lambda: load_private_key(fifo), fifo)
    assert isinstance(refused, SignatureError) and "not a regular file" in str(refused)
    huge = tmp_path / "trust"
    with huge.open("wb") as f:
        f.truncate(MAX_TRUST_LIST_BYTES + 1)  # sparse: nothing to write, and nothing of it may be read
    with pytest.raises(FileRefusedError, match="larger than"):
        TrustList.load(huge)
    huge.write_bytes(b"ed25519 \xff\xfe\n")
    with pytest.raises(SignatureError, match="not UTF-8 text"):
        TrustList.load(huge)
