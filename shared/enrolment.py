"""Enrolled devices: SecAgg+ public keys signed by an identity the coordinator cannot make.

SecAgg+ (Bell et al., CCS 2020) keeps a device's delta from a coordinator that follows the protocol.
One that does not can *substitute keys*: it forwards its own public keys as a neighbour's, the
device encrypts that neighbour's Shamir shares (of its mask seed, of its pairwise-mask key) for the
coordinator, which then holds enough of them to remove every mask of that device's vector. The
malicious-server variant closes that by signing the keys with identities a PKI vouches for; ours:

* an **enrolment authority** (an Ed25519 key, ``fleetlora keys generate``) held by whoever admits
  devices to the fleet, *not* by the coordinator's operator (an authority the coordinator holds can
  enrol devices of its own, and SecAgg+ then protects nothing from it);
* each device has an **identity** (an Ed25519 key of its own) and an **enrolment**: the
  authority's signature over the identity's public key (``fleetlora keys enrol``);
* in setup a device signs its two SecAgg+ public keys, bound to the Flower run, the round and its
  node id, with its identity; a device whose node config names the authorities it trusts
  (``secagg-enrolment-trust``) encrypts shares only for neighbours whose keys carry a valid
  signature by an enrolled identity, each identity once (``client/secagg.py``).

Signatures are ``cryptography``'s Ed25519 (as releases are: ``shared/sign.py``); this module only
fixes the bytes that are signed, with a context string of their own so no signature of one kind
passes as another.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.atomic import write_atomic
from shared.files import read_bounded
from shared.sign import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    SignatureError,
    TrustList,
    load_or_generate_key,
    load_private_key,
    raw_key_id,
    verify_raw,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ENROLMENT_BYTES = PUBLIC_KEY_BYTES + SIGNATURE_BYTES
"""An enrolment as it travels: the authority's raw public key, then its signature over the identity."""
MAX_ENROLMENT_FILE_BYTES = 4096
_ENROLMENT_CONTEXT = b"fleetlora secagg enrolment v1\0"
_KEYS_CONTEXT = b"fleetlora secagg keys v1\0"
_STORY_CONTEXT = b"fleetlora secagg survivors v1\0"
_FILE_TAG = "fleetlora-enrolment-v1"


@dataclass(frozen=True)
class Identity:
    """A device's identity key and its enrolment (:data:`ENROLMENT_BYTES`)."""

    key: Ed25519PrivateKey
    public: bytes
    enrolment: bytes


@dataclass(frozen=True)
class KeysProof:
    """What a device adds to its setup reply: its identity, its enrolment, its signature over its keys.

    The fields are in ``shared.secagg_stages.PROOF_KEYS``' order (``astuple`` gives them as they travel).
    """

    identity: bytes
    enrolment: bytes
    signature: bytes


def enrol(authority: Ed25519PrivateKey, identity: bytes) -> bytes:
    """Return the enrolment of the raw public key ``identity`` by ``authority``."""
    if len(identity) != PUBLIC_KEY_BYTES:
        raise SignatureError(f"an identity is a raw {PUBLIC_KEY_BYTES}-byte Ed25519 public key, got {len(identity)}")
    return authority.public_key().public_bytes_raw() + authority.sign(_ENROLMENT_CONTEXT + identity)


def write_enrolment(path: str | Path, identity: bytes, enrolment: bytes) -> None:
    """Write the enrolment file a device's node config names (``secagg-enrolment``)."""
    words = [_FILE_TAG, base64.b64encode(identity).decode(), base64.b64encode(enrolment).decode()]
    write_atomic(Path(path), (" ".join(words) + "\n").encode())


def enrol_identity(authority: Ed25519PrivateKey, key_path: Path, enrolment_path: Path) -> bytes:
    """Make a device's identity key at ``key_path`` if it has none; (re)write its enrolment by ``authority``.

    For whoever holds both (a local fleet, the demo's virtual devices); a real device keeps its key
    and sends only its ``.pub`` to be enrolled (``fleetlora keys enrol``). Returns the raw identity.
    """
    key = load_or_generate_key(key_path)
    public = key.public_key().public_bytes_raw()
    write_enrolment(enrolment_path, public, enrol(authority, public))
    return public


def load_identity(key_path: str | Path, enrolment_path: str | Path) -> Identity:
    """Load a device's identity key and its enrolment file; refuse an enrolment of another key or a forged one.

    Raises
    ------
    SignatureError
        The file is not an enrolment, is of another identity, or its signature does not hold.
    """
    key = load_private_key(key_path)
    text = read_bounded(enrolment_path, MAX_ENROLMENT_FILE_BYTES).decode("utf-8", errors="replace")
    words = text.split()
    try:
        if len(words) != 3 or words[0] != _FILE_TAG:
            raise ValueError
        identity, enrolment = (base64.b64decode(w, validate=True) for w in words[1:])
    except (ValueError, binascii.Error):
        raise SignatureError(f"{enrolment_path}: not a '{_FILE_TAG} <identity> <enrolment>' file") from None
    public = key.public_key().public_bytes_raw()
    if identity != public:
        raise SignatureError(f"{enrolment_path} enrols another identity than the key {key_path}")
    if not enrolment_holds(public, enrolment):
        raise SignatureError(f"{enrolment_path}: the enrolment's signature does not hold")
    return Identity(key, public, enrolment)


def enrolment_holds(identity: bytes, enrolment: bytes) -> bool:
    """Whether ``enrolment`` is the signature of the authority it names over ``identity`` (not whether trusted)."""
    if len(enrolment) != ENROLMENT_BYTES:
        return False
    return verify_raw(enrolment[:PUBLIC_KEY_BYTES], _ENROLMENT_CONTEXT + identity, enrolment[PUBLIC_KEY_BYTES:])


def keys_message(run_id: int, round_id: str, node_id: int, pk1: bytes, pk2: bytes) -> bytes:
    """Return the bytes a device signs in setup: its two public keys, for this run, round and node id."""
    fields = [run_id, round_id, node_id, base64.b64encode(pk1).decode(), base64.b64encode(pk2).decode()]
    return _KEYS_CONTEXT + json.dumps(fields).encode()


def identity_signed(identity: bytes, message: bytes, signature: object) -> bool:
    """Return whether ``signature`` is the raw Ed25519 identity's over ``message`` (keys or survivor list)."""
    return (
        isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES and verify_raw(identity, message, signature)
    )


def prove_keys(identity: Identity, run_id: int, round_id: str, node_id: int, pk1: bytes, pk2: bytes) -> KeysProof:
    """Return the proof a device attaches to its public keys."""
    signature = identity.key.sign(keys_message(run_id, round_id, node_id, pk1, pk2))
    return KeysProof(identity.public, identity.enrolment, signature)


def check_keys(trust: TrustList, proof: KeysProof, message: bytes) -> None:
    """Check that an identity ``trust`` enrolled signed ``message`` (:func:`keys_message`).

    A ``revoked`` line in ``trust`` revokes an authority (every identity it enrolled) or one identity
    (a device lost, or gone from the fleet): enrolments do not expire.

    Raises
    ------
    SignatureError
        Naming what failed: sizes, a revoked identity, the authority (unknown or revoked), the enrolment,
        the keys' signature.
    """
    sizes = (len(proof.identity), len(proof.enrolment), len(proof.signature))
    if sizes != (PUBLIC_KEY_BYTES, ENROLMENT_BYTES, SIGNATURE_BYTES):
        raise SignatureError(f"a keys proof of {sizes} bytes, expected (32, 96, 64)")
    if raw_key_id(proof.identity) in trust.revoked:
        raise SignatureError(
            f"its identity {raw_key_id(proof.identity)} is revoked in the device's enrolment trust list"
        )
    authority = proof.enrolment[:PUBLIC_KEY_BYTES]
    signer = raw_key_id(authority)
    if signer in trust.revoked:
        raise SignatureError(f"enrolled by authority {signer}, which the device's enrolment trust list revokes")
    if trust.trusted.get(signer) != authority:
        raise SignatureError(f"enrolled by authority {signer}, which is not in the device's enrolment trust list")
    if not enrolment_holds(proof.identity, proof.enrolment):
        raise SignatureError(f"its enrolment by authority {signer} does not hold")
    if not identity_signed(proof.identity, message, proof.signature):
        raise SignatureError("the public keys are not the ones its identity signed for this run, round and node")


def story_message(run_id: int, round_id: str, node_id: int, pk1: bytes, alive: list[int]) -> bytes:
    """Return the bytes a device signs before unmask: the neighbours the coordinator told it survived (itself too).

    Bound to the round's first public key too, so a list signed in a setup the coordinator restarted
    does not pass for one of the keys in use.
    """
    fields = [run_id, round_id, node_id, base64.b64encode(pk1).decode(), sorted(alive)]
    return _STORY_CONTEXT + json.dumps(fields).encode()
