"""Ed25519 signing keys, trust lists, and signatures over manifest bytes (``cryptography``).

* The **private key** (server only) is a PKCS#8 PEM file readable by its owner alone: a key
  file any other user can read is refused, as ssh does.
* A **key id** is the first 16 hex digits of SHA-256 of the raw 32-byte public key.
* A **trust list** (devices) is a text file, one key per line, in the form ``fleetlora keys
  show`` prints::

      ed25519 <base64 raw public key> [comment]
      revoked ed25519 <base64 raw public key> [comment]

  Several trusted keys allow rotation; a revoked line distrusts a key even if it is also
  listed as trusted. Blank lines and ``#`` comments are ignored.

``cryptography`` is imported only where a key is made, read or used: a trust list is parsed
without it, and one made with ``in_child=True`` checks each signature in a short-lived child
process (``python -m shared.sign``), so a serving process (``fleetlora infer``) never maps the
library (~11 MiB of its resident memory).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.atomic import write_atomic
from shared.cli import python_module
from shared.files import MAX_PEM_BYTES, FileRefusedError, read_bounded

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
MAX_TRUST_LIST_BYTES = 1 << 20  # a line of ~60 bytes per key: thousands of keys; more is not a trust list
CHILD_TIMEOUT_S = 120  # a python start and one Ed25519 check, on a loaded device
VALID, INVALID = 0, 10  # the child's exit codes; any other (1: an uncaught exception) is a failed check


class SignatureError(ValueError):
    """A signature or key check failed; the message says which and why."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 of the raw public key."""
    return raw_key_id(public_key.public_bytes_raw())


def raw_key_id(raw: bytes) -> str:
    """:func:`key_id` of a raw 32-byte public key."""
    return hashlib.sha256(raw).hexdigest()[:16]


def public_line(public_key: Ed25519PublicKey, comment: str = "") -> str:
    """Return the trust-list line of a public key."""
    raw = public_key.public_bytes_raw()
    return f"ed25519 {base64.b64encode(raw).decode()} {comment}".rstrip()


def generate_key(path: str | Path, force: bool = False) -> Ed25519PrivateKey:
    """Create a private key file (mode 0600) and ``<path>.pub`` with its trust-list line.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is not set (a signing key is never overwritten silently).
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; refusing to overwrite a signing key (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization  # here: 7 MB a verifier never needs

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_atomic(path, pem, mode=0o600)  # a fresh temp file (O_EXCL | O_NOFOLLOW): never through a planted link
    write_trust_line(Path(str(path) + ".pub"), key)
    return key


def load_or_generate_key(path: Path) -> Ed25519PrivateKey:
    """Load the key at ``path``, or make it (and its ``.pub``) there if there is none."""
    return load_private_key(path) if path.exists() else generate_key(path)


def write_trust_line(path: str | Path, key: Ed25519PrivateKey) -> None:
    """Write ``path``: a trust list of one line, ``key``'s public key (what ``generate_key`` writes as ``.pub``)."""
    line = public_line(key.public_key(), f"fleetlora {key_id(key.public_key())}")
    write_atomic(Path(path), f"{line}\n".encode())


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a signing key, refusing one that other users can read or that is not Ed25519."""
    try:
        pem = read_bounded(path, MAX_PEM_BYTES, private=True)  # checked on the descriptor it is read from
    except FileNotFoundError:
        hint = f"create one with `fleetlora keys generate {path}`"
        raise FileNotFoundError(f"signing key {path} not found; {hint}") from None
    except FileRefusedError as exc:
        raise SignatureError(f"signing key {exc}") from None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {path} is not a readable PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path} is {type(key).__name__}, expected Ed25519")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of ``data``."""
    return key.sign(data)


@dataclass
class TrustList:
    """Trusted and revoked public keys, by key id (raw 32-byte Ed25519 keys).

    ``in_child``: check signatures in a child process, so this one never imports ``cryptography``
    (the checks that need no key, revoked or unknown signer and signature length, stay here).
    """

    trusted: dict[str, bytes] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    in_child: bool = False

    @classmethod
    def of(cls, *keys: Ed25519PublicKey, revoked: tuple[Ed25519PublicKey, ...] = ()) -> TrustList:
        """Trust ``keys``, distrust ``revoked``."""
        return cls({key_id(k): k.public_bytes_raw() for k in keys}, {key_id(k) for k in revoked})

    @classmethod
    def load(cls, path: str | Path, in_child: bool = False) -> TrustList:
        """Parse a trust-list file (format in the module docstring); a bad line is named by number."""
        trust = cls(in_child=in_child)
        try:
            text = read_bounded(path, MAX_TRUST_LIST_BYTES).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SignatureError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            revoked = words[0] == "revoked"
            words = words[1:] if revoked else words
            if len(words) < 2 or words[0] != "ed25519":
                raise SignatureError(f"{path}:{number}: expected '[revoked] ed25519 <base64 key> [comment]'")
            try:
                raw = base64.b64decode(words[1], validate=True)
            except binascii.Error:
                raw = b""
            if len(raw) != PUBLIC_KEY_BYTES:
                raise SignatureError(f"{path}:{number}: not a base64 32-byte Ed25519 public key")
            if revoked:
                trust.revoked.add(raw_key_id(raw))
            else:
                trust.trusted[raw_key_id(raw)] = raw
        return trust

    def verify(self, signer: str, data: bytes, signature: bytes) -> None:
        """Check that ``signature`` over ``data`` is by trusted, unrevoked key ``signer``.

        Raises
        ------
        SignatureError
            Naming why: revoked key, unknown key, malformed or invalid signature.
        """
        if signer in self.revoked:
            raise SignatureError(f"signed by key {signer}, which the trust list revokes")
        if signer not in self.trusted:
            raise SignatureError(f"signed by key {signer}, which is not in the trust list")
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(f"signature is {len(signature)} bytes, expected {SIGNATURE_BYTES}")
        raw = self.trusted[signer]
        valid = _verify_in_child(raw, data, signature) if self.in_child else verify_raw(raw, data, signature)
        if not valid:
            raise SignatureError(f"signature does not match the manifest for key {signer}")


def verify_raw(raw: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``data`` is valid for the raw public key (here, with ``cryptography``)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _verify_in_child(raw: bytes, data: bytes, signature: bytes) -> bool:
    """:func:`verify_raw` in ``python -m shared.sign``, handed key, signature and data on stdin; fails closed."""
    try:
        done = subprocess.run(
            python_module("shared.sign"), input=raw + signature + data,
            capture_output=True, timeout=CHILD_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SignatureError(f"the signature check could not run: {exc}") from None
    if done.returncode not in (VALID, INVALID):
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise SignatureError(f"the signature check failed (exit {done.returncode}): {detail[0]}")
    return done.returncode == VALID


def _child_main() -> int:
    """``python -m shared.sign``: stdin is a raw public key, a signature, then the data; exit VALID or INVALID."""
    message = sys.stdin.buffer.read()
    head = PUBLIC_KEY_BYTES + SIGNATURE_BYTES
    if len(message) < head:
        print(f"expected at least {head} bytes on stdin, got {len(message)}", file=sys.stderr)
        return 2
    raw, signature = message[:PUBLIC_KEY_BYTES], message[PUBLIC_KEY_BYTES:head]
    return VALID if verify_raw(raw, message[head:], signature) else INVALID


if __name__ == "__main__":
    sys.exit(_child_main())
