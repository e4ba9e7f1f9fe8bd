"""The device's side of SecAgg+ as a Flower client mod: its delta leaves it only masked.

Install as ``ClientApp(mods=[secagg_mod])`` (or ``@app.train(mods=[secagg_mod])``). A ``train``
message that carries a ``secaggplus_configs`` record is one stage of the protocol (Bell et al.,
CCS 2020; the coordinator's side is ``server/secagg/``); any other message passes through:

* ``setup``: check the coordinator's parameters, make two key pairs, return the public keys (an
  enrolled device signs them with its identity: ``shared/enrolment.py``);
* ``share_keys``: split a fresh private-mask seed and the pairwise-mask key into Shamir shares,
  encrypt one of each for every neighbour (ECDH + HKDF + Fernet); a device that takes only enrolled
  neighbours (node config ``secagg-enrolment-trust``) encrypts nothing for keys no enrolled identity
  signed for that neighbour, and keeps nothing of theirs at confirm;
* ``confirm_shares`` (ours, ``shared/secagg_stages.py``): decrypt the shares forwarded to this device,
  keep those that decrypt, name this pair and have a share's form, and say whose they are;
* ``collect_masked_vectors``: check that the neighbours the coordinator links it with are ones whose
  shares it kept, run the train handler (``call_next``), quantize its delta and add the private mask
  and one pairwise mask per linked neighbour, modulo M; return the masked vector *instead of* the
  delta, with the metrics and name;
* ``consistency`` (ours, enrolled rounds): keep the lists unmask will use and sign the survivors among
  them with its identity, once a round;
* ``unmask``: for each neighbour, the seed share if the coordinator says it survived, the key
  share if it dropped, never both (checked), and only once per round; a device that takes only
  enrolled neighbours reveals only by the lists it signed, and only if every neighbour it lists as
  survived signed a list holding it (:func:`_unmask`).

Ported from Flower 1.41's ``flwr/client/mod/secure_aggregation/secaggplus_mod.py`` (which only
runs under the legacy client and masks Flower's ``Parameters``); all cryptography and arithmetic
are Flower's primitives (``flwr.common.secure_aggregation``, ``flwr.supercore.primitives``). Ours:
the checks of every coordinator input (a hostile coordinator must learn nothing but the sum),
the stage and round binding, and the state, kept in ``context.state`` between stages (a ConfigRecord:
Flower keeps it per node and carries it into the next run of a run series), never in globals. Any
refusal raises, which Flower returns to the coordinator as an error reply, and forgets the round's
secrets.

Masking once per round is the train handler's job (``client/client_app.py`` keeps it per run and
server round in the device's replay store); this mod binds what it signs (the group id) to the
collect message's ``server-round``, so the two name one round.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import astuple, dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from client.device import node_integer, secagg_enrolment
from shared.config_aggregation import MAX_SECURE_SHARES
from shared.enrolment import Identity, KeysProof, check_keys, identity_signed, keys_message, prove_keys, story_message
from shared.secagg_prg import keystreams as prg_keystreams
from shared.secagg_stages import (
    ACCEPTED_LIST,
    CONFIRM_SHARES,
    CONSISTENCY,
    MAX_CIPHERTEXT_BYTES,
    MAX_KEY_BYTES,
    PROOF_KEYS,
    STORY,
    STORY_SIGNATURE,
    STORY_SIGNATURE_OF,
    is_share,
)
from shared.sign import SignatureError, TrustList

MIN_THRESHOLD_KEY = "secagg-min-threshold"
"""Node config: the fewest devices whose sum this device lets a round reveal (the coordinator picks the graph)."""
MAX_SAMPLE = 100_000
MAX_MODULUS = 1 << 32  # the range of shared.secagg_prg's uint32 keystream
_PREVIOUS = {
    Stage.SHARE_KEYS: (Stage.SETUP,),
    CONFIRM_SHARES: (Stage.SHARE_KEYS,),
    Stage.COLLECT_MASKED_VECTORS: (CONFIRM_SHARES,),
    CONSISTENCY: ("masked",),
    Stage.UNMASK: ("masked", CONSISTENCY),  # an enrolled device takes it only after consistency (_unmask)
}


class SecAggDeviceError(ValueError):
    """The coordinator asked for something the protocol does not allow; this device stops the round."""


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer one SecAgg+ stage (see the module docstring); pass any other message to ``call_next``."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content:
        return call_next(msg, context)
    record = context.state.config_records.get(RECORD_KEY_STATE, ConfigRecord({"stage": ""}))
    try:
        stage, values = _stage(msg, str(record["stage"]))
        if stage == Stage.SETUP:
            state = _setup(values, msg)
            floor = node_integer(context.node_config, MIN_THRESHOLD_KEY, MAX_SECURE_SHARES, 4, "an integer >= 1")
            _check(floor is None or state.threshold >= floor, f"threshold {state.threshold} below {MIN_THRESHOLD_KEY}")
            identity, trust = secagg_enrolment(context.node_config)  # all three settings or none
            state.enrolled_only = trust is not None
            keys = {Key.PUBLIC_KEY_1: state.pk1, Key.PUBLIC_KEY_2: state.pk2}
            if identity is not None:
                proof = prove_keys(identity, context.run_id, state.round, state.nid, state.pk1, state.pk2)
                keys |= dict(zip(PROOF_KEYS, astuple(proof), strict=True))
            out = _configs(keys)
        else:
            state = _Round.from_record(record)
            _check(state.round == msg.metadata.group_id, f"stage {stage} of another round")
            if stage == Stage.SHARE_KEYS:
                enrolled = None
                if state.enrolled_only:
                    identity, trust = secagg_enrolment(context.node_config)
                    if identity is None or trust is None:
                        raise SecAggDeviceError("secure aggregation refused: its enrolment left its node config")
                    enrolled = (trust, identity.public)
                out = _configs(_share_keys(state, values, enrolled, context.run_id))
            elif stage == CONFIRM_SHARES:
                out = _configs(_confirm(state, values))
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                out = _collect(state, values, msg, context, call_next)
                stage = "masked" if Key.MASKED_PARAMETERS in out else stage
            elif stage == CONSISTENCY:
                out = _configs(_consistency(state, values, secagg_enrolment(context.node_config)[0], context.run_id))
            else:
                out = _configs(_unmask(state, values, context.run_id))
        kept = ConfigRecord({"stage": stage}) if stage == Stage.UNMASK else state.to_record(stage)
    except Exception:
        kept = ConfigRecord({"stage": "aborted"})  # the round's secrets are forgotten
        raise
    finally:
        context.state.config_records[RECORD_KEY_STATE] = kept
    return Message(out, reply_to=msg)


@dataclass
class _Round:
    """The device's view of one secure round, between stages (kept in ``context.state``)."""

    round: str
    nid: int
    sample_num: int
    share_num: int
    threshold: int
    target_range: int
    mod_range: int
    clipping_range: float
    sk1: bytes
    pk1: bytes
    sk2: bytes
    pk2: bytes
    seed: bytes = b""
    enrolled_only: bool = False  # shares only for neighbours whose keys an enrolled identity signed
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # id -> (pk1, pk2), itself too
    shares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # owner -> (seed share, key share)
    linked: list[int] = field(default_factory=list)  # neighbours whose pairwise masks are in the masked vector
    unverified: list[int] = field(default_factory=list)  # neighbours it shares nothing with (enrolled_only)
    identities: dict[int, bytes] = field(default_factory=dict)  # verified neighbours' identities (enrolled_only)
    told: bool = False  # the consistency stage gave it the lists below, and it signed its survivors
    alive: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)

    def to_record(self, stage: str) -> ConfigRecord:
        """Return the state as a ConfigRecord (dicts as parallel lists)."""
        flat: dict[str, Any] = {k: v for k, v in vars(self).items() if not isinstance(v, dict)}
        for name in ("neighbours", "shares"):
            table: dict[int, tuple[bytes, bytes]] = getattr(self, name)
            flat |= {f"{name}:id": list(table), f"{name}:a": [v[0] for v in table.values()]}
            flat[f"{name}:b"] = [v[1] for v in table.values()]
        flat |= {"identities:id": list(self.identities), "identities:key": list(self.identities.values())}
        return ConfigRecord({**{k: list(v) if isinstance(v, list) else v for k, v in flat.items()}, "stage": stage})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> _Round:
        """Rebuild the state this device wrote (not an outside input)."""
        values: dict[str, Any] = {k: v for k, v in record.items() if ":" not in k and k != "stage"}
        for name in ("neighbours", "shares"):
            ids, a, b = (_items(record, f"{name}:{p}") for p in ("id", "a", "b"))
            values[name] = {i: (x, y) for i, x, y in zip(ids, a, b, strict=True)}
        ids, keys = _items(record, "identities:id"), _items(record, "identities:key")
        values["identities"] = dict(zip(ids, keys, strict=True))
        for name in ("linked", "unverified", "alive", "dead"):
            values[name] = _items(record, name)
        return cls(**values)


def _items(record: ConfigRecord, key: str) -> list[Any]:
    value = record.get(key, [])
    return list(value) if isinstance(value, list) else []


def _stage(msg: Message, previous: str) -> tuple[str, dict[str, Any]]:
    """Return the message's stage and values, refusing a stage out of order (setup may always start afresh)."""
    cfg = msg.content[RECORD_KEY_CONFIGS]
    _check(isinstance(cfg, ConfigRecord), f"'{RECORD_KEY_CONFIGS}' is not a ConfigRecord")
    values: dict[str, Any] = dict(cfg.items())
    stage = values.pop(Key.STAGE, None)
    if stage != Stage.SETUP:
        _check(stage in _PREVIOUS, f"unknown stage {stage!r:.40}")
        _check(previous in _PREVIOUS[str(stage)], f"stage {stage} after {previous!r}")
    return str(stage), values


def _configs(values: Mapping[str, Any]) -> RecordDict:
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(values))})


def _setup(values: Mapping[str, Any], msg: Message) -> _Round:
    """Check the coordinator's parameters (they decide what the shares protect) and make this round's keys."""
    names = ("sample_num", "share_num", "threshold", "target_range", "mod_range")
    _check(set(values) == {*names, "clipping_range"}, f"setup keys {sorted(values)[:8]}")
    _check(all(type(values[k]) is int for k in names), "setup values that are not integers")
    n, s, t = values["sample_num"], values["share_num"], values["threshold"]
    levels, modulus, clip_range = values["target_range"], values["mod_range"], values["clipping_range"]
    _check(2 <= s <= n <= MAX_SAMPLE and s <= MAX_SECURE_SHARES, f"{s} shares for {n} devices")
    # t <= s/2 would let the coordinator gather both the seed and the key of one device: refused
    _check(s // 2 + 1 <= t <= s, f"threshold {t} of {s} shares (must be more than half)")
    _check(0 < modulus <= MAX_MODULUS and modulus & (modulus - 1) == 0, f"modulus {modulus}")
    _check(1 <= levels and n * levels < modulus, f"{levels} levels for {n} devices under modulus {modulus}")
    _check(type(clip_range) is float and math.isfinite(clip_range) and clip_range > 0, f"clip range {clip_range!r}")
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    return _Round(
        msg.metadata.group_id,
        msg.metadata.dst_node_id,
        n,
        s,
        t,
        levels,
        modulus,
        clip_range,
        private_key_to_bytes(sk1),
        public_key_to_bytes(pk1),
        private_key_to_bytes(sk2),
        public_key_to_bytes(pk2),
    )


def _share_keys(
    state: _Round, values: Mapping[str, Any], enrolled: tuple[TrustList, bytes] | None, run_id: int
) -> dict[str, Any]:
    """Encrypt a share of a fresh seed and of the pairwise-mask key for each neighbour the coordinator named.

    With ``enrolled`` (the authorities it trusts and its own identity: it takes only enrolled
    neighbours), only for those whose keys an identity they enrolled signed for this run, round and
    node (:func:`_unverified`): a coordinator that forwards keys of its own as a neighbour's gets no
    share encrypted for them.
    """
    _check(state.threshold <= len(values) <= state.share_num, f"{len(values)} neighbours' keys")
    proofs: dict[int, KeysProof] = {}
    for name, keys in values.items():
        _check(name.isascii() and name.isdigit() and str(int(name)) == name, f"neighbour id {name!r:.30}")
        _check(isinstance(keys, list) and len(keys) in (2, 2 + len(PROOF_KEYS)), f"keys of {name}")
        _check(all(_is_key(k) for k in keys[:2]) and all(isinstance(k, bytes) for k in keys), f"keys of {name}")
        state.neighbours[int(name)] = (keys[0], keys[1])
        if len(keys) > 2:
            proofs[int(name)] = KeysProof(*keys[2:])
    _check(state.neighbours.get(state.nid) == (state.pk1, state.pk2), "its own public keys are missing or altered")
    flat = [k for pair in state.neighbours.values() for k in pair]
    _check(len(set(flat)) == len(flat), "two neighbours share a public key")
    if enrolled is not None:
        why = _unverified(state, *enrolled, proofs, run_id)
        state.unverified = sorted(why)
        state.identities = {n: proofs[n].identity for n in state.neighbours if n != state.nid and n not in why}
        verified = len(state.neighbours) - len(why)
        _check(
            verified >= state.threshold,
            f"{verified - 1} neighbours whose keys an enrolled identity signed, fewer than the threshold - 1; "
            + "; ".join(f"{n}: {reason}" for n, reason in sorted(why.items())[:4]),
        )
    state.seed = os.urandom(32)
    seed_shares = create_shares(state.seed, state.threshold, state.share_num)
    key_shares = create_shares(state.sk1, state.threshold, state.share_num)
    sk2 = bytes_to_private_key(state.sk2)
    dsts, texts = [], []
    for idx, other in enumerate(sorted(state.neighbours)):  # a share's index is its holder's place: kept
        if other == state.nid:
            state.shares[other] = (seed_shares[idx], key_shares[idx])
            continue
        if other in state.unverified:
            continue
        plaintext = share_keys_plaintext_concat(state.nid, other, seed_shares[idx], key_shares[idx])
        dsts.append(other)
        texts.append(encrypt(generate_shared_key(sk2, bytes_to_public_key(state.neighbours[other][1])), plaintext))
    return {Key.DESTINATION_LIST: dsts, Key.CIPHERTEXT_LIST: texts}


def _unverified(
    state: _Round, trust: TrustList, own: bytes, proofs: Mapping[int, KeysProof], run_id: int
) -> dict[int, str]:
    """Return the neighbours whose keys no enrolled identity signed for them, with why.

    An identity counts for one node: two neighbours whose keys one identity signed (its owner lent
    it) are both left out, and so is one that signed for this device's identity. A proof that does
    not verify counts for no one, so copying another device's proof takes nobody out but the copier.
    """
    _check(proofs.get(state.nid, KeysProof(b"", b"", b"")).identity == own, "its own identity is missing or altered")
    why: dict[int, str] = {}
    holders: dict[bytes, list[int]] = {own: [state.nid]}
    for nid, (pk1, pk2) in state.neighbours.items():
        proof = proofs.get(nid)
        if nid == state.nid:
            continue
        if proof is None:
            why[nid] = "its keys carry no enrolment"
            continue
        try:
            check_keys(trust, proof, keys_message(run_id, state.round, nid, pk1, pk2))
        except SignatureError as exc:
            why[nid] = str(exc)
            continue
        holders.setdefault(proof.identity, []).append(nid)
    for nodes in holders.values():
        if len(nodes) > 1:
            why |= {n: "an identity that signs for another node too" for n in nodes if n != state.nid}
    return why


def _confirm(state: _Round, values: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the neighbours' shares that decrypt, name this pair and have a share's form; say whose they are.

    A ciphertext that fails is not this device's fault nor, alone, a reason to stop: its sender (or
    the coordinator that forwarded it) is the one at fault, and the coordinator unlinks that pair.
    A forwarding that breaks the protocol (a source that is not a neighbour, lists that do not pair
    up) is the coordinator's, and refused.
    """
    _check(set(values) == {Key.CIPHERTEXT_LIST, Key.SOURCE_LIST}, f"confirm keys {sorted(values)[:4]}")
    srcs, texts = values[Key.SOURCE_LIST], values[Key.CIPHERTEXT_LIST]
    _check(isinstance(srcs, list) and isinstance(texts, list) and len(srcs) == len(texts), "sources and ciphertexts")
    others = set(state.neighbours) - {state.nid}
    _check(len(set(srcs)) == len(srcs) and set(srcs) <= others, "sources that are not its neighbours")
    sk2 = bytes_to_private_key(state.sk2)
    accepted = []
    for src, text in zip(srcs, texts, strict=True):
        if src in state.unverified:
            continue  # whoever wrote it, it is not a neighbour's this device can vouch for
        shares = _open(state, sk2, src, text)
        if shares is not None:
            state.shares[src] = shares
            accepted.append(src)
    return {ACCEPTED_LIST: accepted}


def _open(state: _Round, sk2: ec.EllipticCurvePrivateKey, src: int, text: Any) -> tuple[bytes, bytes] | None:
    """Return the two shares ``src`` encrypted for this device, or None if the ciphertext is not that."""
    if not isinstance(text, bytes) or len(text) > MAX_CIPHERTEXT_BYTES:
        return None
    try:
        plain = decrypt(generate_shared_key(sk2, bytes_to_public_key(state.neighbours[src][1])), text)
        actual, dst, seed_share, key_share = share_keys_plaintext_separate(plain)
    except Exception:  # noqa: BLE001 (Fernet's InvalidToken, or a plaintext that does not split: the same refusal)
        return None
    if actual != src or dst != state.nid or not (is_share(seed_share) and is_share(key_share)):
        return None
    return seed_share, key_share


def _collect(
    state: _Round, values: Mapping[str, Any], msg: Message, context: Context, call_next: ClientAppCallable
) -> RecordDict:
    """Check the links against the shares kept, train, and return the delta masked (or the reply as is, if none)."""
    _check(set(values) == {Key.SOURCE_LIST}, f"collect keys {sorted(values)[:4]}")
    config = msg.content.config_records.get("config")
    server_round = None if config is None else config.get("server-round")
    # what it signs names the round by the group id, the train handler masks once per server round: one round
    _check(
        type(server_round) is int and state.round == str(server_round),
        f"group {state.round!r:.24} for another round (server-round {server_round!r:.24})",
    )
    srcs = values[Key.SOURCE_LIST]
    _check(isinstance(srcs, list) and len(set(srcs)) == len(srcs), "sources")
    kept = set(state.shares) - {state.nid}
    _check(set(srcs) <= kept, "a link with a neighbour whose shares it does not hold")
    _check(len(srcs) + 1 >= state.threshold, f"{len(srcs)} linked neighbours, fewer than the threshold - 1")
    state.shares = {n: state.shares[n] for n in [state.nid, *srcs]}  # the unlinked ones' shares are never revealed
    reply = call_next(msg, context)
    if reply.has_error():
        raise SecAggDeviceError(f"the train handler failed: {str(reply.error.reason)[:200]}")
    arrays = reply.content.array_records.get("arrays")
    if arrays is None:  # it refused the release: no delta, nothing to mask or to reveal
        return RecordDict(dict(reply.content.items()))
    state.linked = list(srcs)
    out = RecordDict({k: v for k, v in reply.content.items() if k != "arrays"})
    out[Key.MASKED_PARAMETERS] = mask_delta(state, arrays)
    return out


def mask_delta(state: _Round, arrays: ArrayRecord) -> ArrayRecord:
    """Quantize the delta (Flower's ``quantize``) and add the private and pairwise masks, modulo M (as uint32).

    In uint32, in place, one tensor's mask at a time: M divides 2^32, so uint32 arithmetic, which
    wraps modulo 2^32, reduced by ``& (M - 1)`` is arithmetic modulo M. The codes are 4 bytes an
    entry whatever the neighbours (255 at most), and a mask is one tensor's.
    """
    keys = sorted(arrays)  # the coordinator sums in the same order
    codes = []
    for key in keys:
        delta = arrays[key].numpy()
        _check(bool(np.isfinite(delta).all()), "a delta that is not finite")
        quantized = quantize([delta.astype(np.float64)], state.clipping_range, state.target_range)[0]
        codes.append(quantized.astype(np.uint32))  # in [0, L], L < M <= 2^32
    _add_masks(codes, state.seed, state.mod_range, 1)
    sk1 = bytes_to_private_key(state.sk1)
    for other in state.linked:  # one mask per pair, added by the larger id, subtracted by the smaller: they cancel
        pair = generate_shared_key(sk1, bytes_to_public_key(state.neighbours[other][0]))
        _add_masks(codes, pair, state.mod_range, 1 if state.nid > other else -1)
    return ArrayRecord({k: Array(c) for k, c in zip(keys, codes, strict=True)})


def _add_masks(codes: list[np.ndarray], seed: bytes, modulus: int, sign: int) -> None:
    """Add (``sign`` 1) or subtract (-1) the masks of ``seed`` to ``codes``, modulo ``modulus``, in place."""
    low = np.uint32(modulus - 1)
    op = np.add if sign > 0 else np.subtract
    for code, mask in zip(codes, prg_keystreams(seed, modulus, [c.shape for c in codes]), strict=True):
        op(code, mask, out=code)
        np.bitwise_and(code, low, out=code)


def _lists(state: _Round, values: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """Return the survived and dropped lists the coordinator sent, checked against this device's links."""
    alive, dead = values.get(Key.ACTIVE_NODE_ID_LIST), values.get(Key.DEAD_NODE_ID_LIST)
    if not (isinstance(alive, list) and isinstance(dead, list)):
        raise SecAggDeviceError("secure aggregation refused: unmask lists")
    _check(len(set(alive)) == len(alive) and len(set(dead)) == len(dead), "a node listed twice")
    _check(not set(alive) & set(dead), "a node listed as both survived and dropped")
    _check(state.nid in alive and set(alive) | set(dead) <= {*state.linked, state.nid}, "nodes it is not linked with")
    _check(len(alive) >= state.threshold, "fewer survivors than the threshold")
    return alive, dead


def _consistency(state: _Round, values: Mapping[str, Any], identity: Identity | None, run_id: int) -> dict[str, Any]:
    """Keep the lists unmask will use; sign the survivors among them with its identity (empty without one).

    Signed once per round (the stage follows collect only): a device tells every neighbour the same story.
    """
    _check(set(values) == {Key.ACTIVE_NODE_ID_LIST, Key.DEAD_NODE_ID_LIST}, f"consistency keys {sorted(values)[:4]}")
    state.alive, state.dead = _lists(state, values)
    state.told = True
    if identity is None:
        return {STORY_SIGNATURE: b""}
    return {STORY_SIGNATURE: identity.key.sign(story_message(run_id, state.round, state.nid, state.pk1, state.alive))}


def _unmask(state: _Round, values: Mapping[str, Any], run_id: int) -> dict[str, Any]:
    """Reveal, per linked neighbour, the seed share (survived) or the key share (dropped): one kind each, once.

    A device that takes only enrolled neighbours first checks that every neighbour its list calls
    survived signed a list (at consistency, once a round) that calls this device survived. Opening
    one device X's masked vector takes X's seed (threshold seed shares, from holders told X
    survived) and the pairwise key of X with each such holder G. X's own key cannot be rebuilt: its
    key shares come from holders told X dropped, disjoint from the seed's, and there are at most
    ``share_num`` holders in all, fewer than twice the threshold. G's key cannot either: G revealed,
    so every neighbour in G's survived list signed that G survived and reveals nothing of G's key,
    and the ones outside that list are at most ``share_num`` minus the threshold, fewer than the
    threshold. This holds against a coordinator with honest devices; colluding devices that sign two
    lists weaken it, as they weaken the threshold itself.
    """
    stories = {k for k in values if k.startswith((STORY, STORY_SIGNATURE_OF))}
    _check(
        set(values) - stories == {Key.ACTIVE_NODE_ID_LIST, Key.DEAD_NODE_ID_LIST}, f"unmask keys {sorted(values)[:4]}"
    )
    alive, dead = _lists(state, values)
    if state.told:
        _check((alive, dead) == (state.alive, state.dead), "unmask lists other than the ones it signed")
    if state.enrolled_only:
        _check(state.told, "an unmask without the consistency stage (this device takes only enrolled neighbours)")
        for other in alive:
            if other != state.nid:
                _check(_corroborates(state, values, other, run_id), f"neighbour {other} did not sign that it survived")
    shares = [state.shares[n][0] for n in alive] + [state.shares[n][1] for n in dead]
    return {Key.NODE_ID_LIST: [*alive, *dead], Key.SHARE_LIST: shares}


def _corroborates(state: _Round, values: Mapping[str, Any], other: int, run_id: int) -> bool:
    """Whether ``other``'s identity signed a survivor list for this round that holds this device."""
    story, signature = values.get(f"{STORY}{other}"), values.get(f"{STORY_SIGNATURE_OF}{other}")
    identity = state.identities.get(other)
    if identity is None or not isinstance(story, list):
        return False
    if len(story) > state.share_num or not all(type(n) is int for n in story) or state.nid not in story:
        return False
    return identity_signed(
        identity, story_message(run_id, state.round, other, state.neighbours[other][0], story), signature
    )


def _is_key(value: Any) -> bool:
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_KEY_BYTES:
        return False
    try:
        return isinstance(bytes_to_public_key(value).curve, ec.SECP384R1)
    except Exception:  # noqa: BLE001 (cryptography raises several kinds on hostile bytes)
        return False


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise SecAggDeviceError(f"secure aggregation refused: {what}")
