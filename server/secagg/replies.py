"""The coordinator's trust boundary for SecAgg+ replies: each stage's reply parsed into a typed, bounded value.

A device writes its reply freely, so every one is parsed here once, before the protocol uses it,
or refused with :class:`SecAggReplyError` naming what is wrong; a refused reply makes that device a
dropout of the stage, never a crash. Record and key names are Flower's
(``flwr.common.secure_aggregation.secaggplus_constants``: ``RECORD_KEY_CONFIGS``, ``Key``), so a
device runs the same wire format as Flower's ``secaggplus_mod`` except for the masked vector,
which travels as an ``ArrayRecord`` (Flower chunks those; a 2.4M-entry adapter as ``bytes`` in a
``ConfigRecord`` would not pass gRPC's message limit).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from shared.enrolment import ENROLMENT_BYTES, KeysProof, enrolment_holds, identity_signed, keys_message
from shared.secagg_stages import (
    ACCEPTED_LIST,
    MAX_CIPHERTEXT_BYTES,
    MAX_KEY_BYTES,
    PROOF_KEYS,
    STORY_SIGNATURE,
    is_share,
)
from shared.sign import PUBLIC_KEY_BYTES, SIGNATURE_BYTES

PASSED_THROUGH = ("metrics", "client")  # the train reply's own records, parsed by the strategy (server/replies.py)
MASK_DTYPE = "uint32"  # masked entries are in [0, M), M <= 2**32
NPY_HEADER_MAX = 192


class SecAggReplyError(ValueError):
    """A device's SecAgg+ reply cannot count; the message says what is wrong with it."""


def parse_public_keys(msg: Message, nid: int, round_id: str) -> tuple[tuple[bytes, bytes], KeysProof | None]:
    """Return a setup reply's two public keys (pairwise masks, share encryption): distinct SECP384R1 keys.

    With them, an enrolled device's proof (its identity, enrolment and signature over the keys): of
    its sizes, its enrolment signed by the authority it names, and signed by its identity for these
    keys, this run, round ``round_id`` and node ``nid``. Whether that authority counts is each
    device's trust list (``shared/enrolment.py``): the coordinator knows none. It refuses a proof that
    fails on its face, and one its identity did not make here: another device's proof, copied, would
    otherwise make both look like one identity lent to two nodes.
    """
    cfg = _configs(msg, {RECORD_KEY_CONFIGS})
    proof = None
    if set(cfg) & set(PROOF_KEYS):
        _keys(cfg, {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, *PROOF_KEYS})
        sizes = (PUBLIC_KEY_BYTES, ENROLMENT_BYTES, SIGNATURE_BYTES)
        for name, size in zip(PROOF_KEYS, sizes, strict=True):
            if len(_bytes(cfg, name, size)) != size:
                raise SecAggReplyError(f"'{name}' is not {size} bytes")
        proof = KeysProof(*(cast(bytes, cfg[name]) for name in PROOF_KEYS))
    else:
        _keys(cfg, {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2})
    keys = tuple(_bytes(cfg, k, MAX_KEY_BYTES) for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2))
    for key in keys:
        try:
            curve = bytes_to_public_key(key).curve
        except Exception as exc:  # noqa: BLE001 (cryptography raises several kinds on hostile bytes)
            raise SecAggReplyError(f"a public key does not parse ({type(exc).__name__})") from None
        if not isinstance(curve, ec.SECP384R1):
            raise SecAggReplyError(f"a public key is on {curve.name}, expected secp384r1")
    if keys[0] == keys[1]:
        raise SecAggReplyError("the two public keys are identical")
    if proof is not None and not enrolment_holds(proof.identity, proof.enrolment):
        raise SecAggReplyError("its enrolment is not signed by the authority it names")
    if proof is not None and not identity_signed(
        proof.identity, keys_message(msg.metadata.run_id, round_id, nid, *keys), proof.signature
    ):
        raise SecAggReplyError("its identity did not sign these keys for this run, round and node")
    return (keys[0], keys[1]), proof


def parse_story_signature(msg: Message, identity: bytes | None, story: bytes) -> bytes:
    """Return a consistency reply's signature: by ``identity`` over ``story`` (the survivor list it was sent).

    Empty from a device without an identity. A signature that does not hold is that device's
    rejection, by name: its neighbours would refuse to reveal for want of it.
    """
    cfg = _configs(msg, {RECORD_KEY_CONFIGS})
    _keys(cfg, {STORY_SIGNATURE})
    value = cfg[STORY_SIGNATURE]
    if identity is None:
        if value != b"":
            raise SecAggReplyError(f"'{STORY_SIGNATURE}' from a device that announced no identity")
        return value
    if not identity_signed(identity, story, value):
        raise SecAggReplyError("its identity did not sign the survivor list it was sent")
    return cast(bytes, value)


def parse_ciphertexts(msg: Message, neighbours: Collection[int]) -> dict[int, bytes]:
    """Return a share-keys reply as destination -> ciphertext, one for each of ``neighbours`` at most."""
    cfg = _configs(msg, {RECORD_KEY_CONFIGS})
    _keys(cfg, {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST})
    dsts = _list(cfg, Key.DESTINATION_LIST, int, len(neighbours))
    texts = _list(cfg, Key.CIPHERTEXT_LIST, bytes, len(neighbours))
    if len(dsts) != len(texts) or len(set(dsts)) != len(dsts):
        raise SecAggReplyError(f"{len(dsts)} destinations (unique: {len(set(dsts))}) for {len(texts)} ciphertexts")
    if not set(dsts) <= set(neighbours):
        raise SecAggReplyError(f"destinations {sorted(set(dsts) - set(neighbours))[:3]} are not its neighbours")
    if any(not 0 < len(t) <= MAX_CIPHERTEXT_BYTES for t in texts):
        raise SecAggReplyError(f"a ciphertext is empty or longer than {MAX_CIPHERTEXT_BYTES} bytes")
    return dict(zip(dsts, texts, strict=True))


def parse_accepted(msg: Message, sources: Collection[int]) -> set[int]:
    """Return a confirm reply's sources whose shares the device kept: a subset of the ``sources`` forwarded to it."""
    cfg = _configs(msg, {RECORD_KEY_CONFIGS})
    _keys(cfg, {ACCEPTED_LIST})
    accepted = _list(cfg, ACCEPTED_LIST, int, len(sources))
    if len(set(accepted)) != len(accepted) or not set(accepted) <= set(sources):
        raise SecAggReplyError(f"accepted sources {sorted(accepted)[:3]}... are repeated or were not forwarded to it")
    return set(accepted)


def parse_masked(
    msg: Message, shapes: Mapping[str, tuple[int, ...]], modulus: int
) -> tuple[dict[str, np.ndarray] | None, RecordDict]:
    """Return a collect reply's masked vector (int64 arrays of ``shapes``, entries in ``[0, modulus)``) and its rest.

    The rest is the device's train-reply records (``metrics``, ``client``) for the strategy's own
    parser. A reply without a masked vector (a device that refused the release) returns ``None``.
    """
    names = set(msg.content.keys())
    extra = sorted(names - {Key.MASKED_PARAMETERS, RECORD_KEY_CONFIGS, *PASSED_THROUGH})
    if extra:
        raise SecAggReplyError(f"the reply holds unexpected records {extra[:3]}")
    rest = RecordDict({k: msg.content[k] for k in PASSED_THROUGH if k in names})
    if Key.MASKED_PARAMETERS not in names:
        return None, rest
    record = msg.content[Key.MASKED_PARAMETERS]
    if not isinstance(record, ArrayRecord):
        raise SecAggReplyError(f"'{Key.MASKED_PARAMETERS}' is a {type(record).__name__}, expected an ArrayRecord")
    missing, unexpected = sorted(set(shapes) - set(record)), sorted(set(record) - set(shapes))
    if missing or unexpected:
        raise SecAggReplyError(f"masked tensors: missing {missing[:2]}, unexpected {unexpected[:2]}")
    return {key: _masked_array(record, key, shape, modulus) for key, shape in shapes.items()}, rest


def parse_shares(msg: Message, asked: Mapping[int, int]) -> dict[int, bytes]:
    """Return an unmask reply as owner -> share, exactly one share for each owner in ``asked`` (owner -> its index).

    Each share must carry the Shamir index its owner gave this device (``stages.share_index``).
    """
    cfg = _configs(msg, {RECORD_KEY_CONFIGS})
    _keys(cfg, {Key.NODE_ID_LIST, Key.SHARE_LIST})
    nids = _list(cfg, Key.NODE_ID_LIST, int, len(asked))
    shares = _list(cfg, Key.SHARE_LIST, bytes, len(asked))
    if len(nids) != len(shares) or set(nids) != set(asked) or len(set(nids)) != len(nids):
        raise SecAggReplyError(f"shares for nodes {sorted(nids)[:3]}..., expected one each for the {len(asked)} asked")
    if not all(is_share(s) for s in shares):
        raise SecAggReplyError("a share is not a 4-byte index and whole 16-byte chunks (at most 1 KiB)")
    for owner, share in zip(nids, shares, strict=True):
        if (index := int.from_bytes(share[:4], "little")) != asked[owner]:
            want = asked[owner]
            raise SecAggReplyError(f"the share of device {owner} carries index {index}, not {want}: not its own")
    return dict(zip(nids, shares, strict=True))


def _configs(msg: Message, names: set[str]) -> ConfigRecord:
    got = set(msg.content.keys())
    if got != names:
        raise SecAggReplyError(f"the reply's records are {sorted(got)[:3]}, expected {sorted(names)}")
    cfg = msg.content[RECORD_KEY_CONFIGS]
    if not isinstance(cfg, ConfigRecord):
        raise SecAggReplyError(f"'{RECORD_KEY_CONFIGS}' is a {type(cfg).__name__}, expected a ConfigRecord")
    return cfg


def _keys(cfg: ConfigRecord, keys: set[str]) -> None:
    if set(cfg) != keys:
        raise SecAggReplyError(f"the reply's keys are {sorted(cfg)[:4]}, expected {sorted(keys)}")


def _bytes(cfg: ConfigRecord, key: str, limit: int) -> bytes:
    value = cfg[key]
    if not isinstance(value, bytes) or not 0 < len(value) <= limit:
        raise SecAggReplyError(f"'{key}' is not 1 to {limit} bytes")
    return value


def _list(cfg: ConfigRecord, key: str, kind: type, limit: int) -> list[Any]:
    value = cfg[key]
    if not isinstance(value, list) or len(value) > limit:
        raise SecAggReplyError(f"'{key}' is not a list of at most {limit} items")
    if any(type(v) is not kind for v in value):  # bool is an int: compared exactly
        raise SecAggReplyError(f"'{key}' holds items that are not {kind.__name__}")
    return value


def _masked_array(record: ArrayRecord, key: str, shape: tuple[int, ...], modulus: int) -> np.ndarray:
    """Decode one masked tensor: declared dtype and shape, bytes bounded before parsing, entries below ``modulus``."""
    arr = record[key]
    if arr.dtype != MASK_DTYPE or tuple(arr.shape) != shape:
        raise SecAggReplyError(f"{key} arrived as {arr.dtype} {tuple(arr.shape)}, expected {MASK_DTYPE} {shape}")
    limit = math.prod(shape) * np.dtype(MASK_DTYPE).itemsize + NPY_HEADER_MAX
    if len(arr.data) > limit:
        raise SecAggReplyError(f"{key} carries {len(arr.data):,} bytes, more than the {limit:,} of its shape")
    try:
        values = arr.numpy()
    except Exception as exc:  # noqa: BLE001 (numpy's .npy reader raises many kinds on hostile bytes)
        raise SecAggReplyError(f"{key} is not a valid .npy array ({type(exc).__name__})") from None
    if values.dtype != np.dtype(MASK_DTYPE) or values.shape != shape:
        raise SecAggReplyError(f"{key}'s bytes hold {values.dtype} {values.shape}, not {MASK_DTYPE} {shape}")
    if values.size and int(values.max()) >= modulus:
        raise SecAggReplyError(f"{key} holds entries >= the modulus {modulus}")
    return values.astype(np.int64)
