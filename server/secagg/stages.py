"""The coordinator's SecAgg+ stages as pure functions: what each stage sends, and what it makes of the replies.

Ported from Flower 1.41's ``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``
(``setup_stage``, ``share_keys_stage``, ``collect_masked_vectors_stage``, ``unmask_stage``), which
needs a ``LegacyContext``; here the stages take and return plain values and the driver
(``server/secagg/protocol.py``) moves them as Messages. The primitives are Flower's own
(``flwr.common.secure_aggregation``: Shamir ``combine_shares``, ``generate_shared_key``,
``dequantize``; keys from ``flwr.supercore.primitives.asymmetric``). The masks are not Flower's
``pseudo_rand_gen`` (it folds each seed to 32 bits: a searchable space) but ``shared/secagg_prg.py``
(HKDF-SHA256 into a ChaCha20 keystream), on both sides.
Differences from Flower's workflow, each a fix:

* the sets of devices are tracked per stage (``keyed`` after setup, ``linked`` after share keys,
  ``survivors`` after the masked vectors): a device lost before share keys has no masks to remove
  and is left out (Flower counts it as dropped, finds none of its shares and halts the round);
* a pair of devices is linked (their ciphertexts forwarded, their pairwise mask used) only if each
  sent the other a ciphertext, so both or neither add the mask;
* and only if each kept the other's shares (our ``confirm_shares`` stage, ``shared/secagg_stages.py``):
  a device whose ciphertexts do not decrypt loses its links, not its neighbours their round;
* a rebuilt pairwise-mask key must match the public key its owner announced, else the round fails.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import astuple, dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, public_key_to_bytes

from server.secagg.params import SecAggParams
from shared.enrolment import KeysProof
from shared.secagg_prg import masks as prg_masks
from shared.secagg_stages import STORY, STORY_SIGNATURE_OF

Vector = dict[str, np.ndarray]
SEED_BYTES = 32  # a device's private-mask seed (os.urandom(32), as Flower's mod)


class SecAggAbortedError(RuntimeError):
    """The round's secure aggregation cannot finish (too few devices or shares): the global adapter stays."""


@dataclass
class RoundState:
    """What the coordinator knows of one round's protocol, stage by stage."""

    params: SecAggParams
    shapes: dict[str, tuple[int, ...]]
    shares: int
    threshold: int
    neighbours: dict[int, frozenset[int]]  # node -> its ring neighbourhood, itself included
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # the keyed devices
    proofs: dict[int, KeysProof] = field(default_factory=dict)  # of the enrolled ones (shared/enrolment.py)
    links: dict[int, dict[int, bytes]] = field(default_factory=dict)  # dst -> src -> ciphertext for dst
    masked_sum: Vector = field(default_factory=dict)
    survivors: set[int] = field(default_factory=set)
    dropped: set[int] = field(default_factory=set)  # linked, then no masked vector: masks removed by shares


def start(params: SecAggParams, nodes: list[int], shapes: Mapping[str, tuple[int, ...]]) -> RoundState:
    """Place the sampled ``nodes`` on a ring in a random order: each has ``shares // 2`` neighbours either side."""
    shares, threshold = params.for_round(len(nodes))
    order = list(nodes)
    secrets.SystemRandom().shuffle(order)  # who neighbours whom must not be up to the devices
    half = shares // 2
    neighbours = {
        nid: frozenset(order[(idx + k) % len(order)] for k in range(-half, half + 1)) for idx, nid in enumerate(order)
    }
    canonical = dict(sorted(shapes.items()))  # the devices mask their tensors in sorted key order: so do we
    return RoundState(params, canonical, shares, threshold, neighbours)


def setup_config(state: RoundState, sampled: int) -> dict[str, int | float | str]:
    """Return the setup stage's configuration, the same for every device (Flower's keys)."""
    p = state.params
    return {
        "sample_num": sampled,
        "share_num": state.shares,
        "threshold": state.threshold,
        "clipping_range": float(p.clip_range),
        "target_range": p.quant_levels,
        "mod_range": p.modulus,
    }


def drop_shared_keys(state: RoundState) -> dict[int, str]:
    """Take out of the round every device whose public key or identity another device announced too; say why.

    A device refuses a share-keys message in which two neighbours share a key (it could be made to
    encrypt one neighbour's shares for another), and an enrolled one a neighbourhood in which one
    identity signs for two nodes: two colluding devices announcing one key (or one identity) would
    take their honest neighbours out. Neither of the two can be told from the other: both go.
    """
    holders: dict[tuple[str, bytes], list[int]] = {}
    for nid, keys in state.public_keys.items():
        proof = state.proofs.get(nid)
        for held in {("a public key", k) for k in keys} | ({("an identity", proof.identity)} if proof else set()):
            holders.setdefault(held, []).append(nid)
    out = {}
    for (what, _), nodes in holders.items():
        if len(nodes) > 1:
            for nid in nodes:
                out[nid] = f"announced {what} that device(s) {sorted(set(nodes) - {nid})[:4]} announced too"
    for nid in out:
        del state.public_keys[nid]
        state.proofs.pop(nid, None)
    return out


def keyed_neighbours(state: RoundState, nid: int) -> dict[int, tuple[bytes, bytes]]:
    """Return the public keys ``nid`` gets in share keys: of its neighbours that sent keys (itself too)."""
    return {n: state.public_keys[n] for n in state.neighbours[nid] if n in state.public_keys}


def forwarded_keys(state: RoundState, nid: int) -> dict[str, list[bytes]]:
    """Return the share-keys message for ``nid``: per keyed neighbour, its two keys and, if enrolled, its proof."""
    out = {}
    for n, keys in keyed_neighbours(state, nid).items():
        proof = state.proofs.get(n)
        out[str(n)] = [*keys, *(astuple(proof) if proof else ())]
    return out


def share_index(state: RoundState, owner: int, holder: int) -> int:
    """Return the Shamir index of the share ``owner`` made for ``holder``: its place among the owner's keyed neighbours.

    The device splits its secrets over its neighbours in sorted order (``client/secagg.py``), so
    the coordinator knows which index each holder's share must carry: a share with another index
    (one copied from another holder's, which ``combine_shares`` refuses as a duplicate) names its sender.
    """
    return sorted(keyed_neighbours(state, owner)).index(holder) + 1


def link(state: RoundState, sent: Mapping[int, Mapping[int, bytes]]) -> None:
    """Keep the ciphertexts of the pairs that both wrote one to the other (``sent``: src -> dst -> ciphertext)."""
    state.links = {nid: {} for nid in sent}
    for src, row in sent.items():
        for dst, text in row.items():
            if dst in sent and src in sent[dst] and dst != src:
                state.links[dst][src] = text
    check(state, set(state.links), "share keys")


def confirm(state: RoundState, accepted: Mapping[int, set[int]]) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Keep the links where each of the pair kept the other's shares (``accepted``: device -> sources it kept).

    A device left with fewer than ``threshold - 1`` links cannot have its secrets rebuilt: it is
    taken out, which can take its neighbours below too, until none is. Returns who refused whose
    shares (sender -> the devices that refused them) and the devices taken out, with why.
    """
    refused: dict[int, list[int]] = {}
    for dst in sorted(accepted):
        for src in sorted(set(state.links[dst]) - accepted[dst]):
            refused.setdefault(src, []).append(dst)
    links = {
        n: {s: t for s, t in state.links[n].items() if s in accepted and s in accepted[n] and n in accepted[s]}
        for n in accepted
    }
    out: dict[int, str] = {}
    while short := sorted(n for n, row in links.items() if len(row) + 1 < state.threshold):
        for nid in short:
            by = refused.get(nid, [])
            out[nid] = (
                f"{len(links[nid])} neighbours and it kept each other's shares, fewer than the threshold - 1 "
                f"({state.threshold - 1})" + (f"; its shares were refused by {len(by)}: {by[:8]}" if by else "")
            )
            del links[nid]
        links = {n: {s: t for s, t in row.items() if s not in out} for n, row in links.items()}
    state.links = links
    check(state, set(links), "confirm shares")
    return refused, out


def add_masked(state: RoundState, nid: int, vector: Vector) -> None:
    """Add one device's masked vector to the running sum, modulo M."""
    if not state.masked_sum:
        state.masked_sum = {k: np.zeros(s, dtype=np.int64) for k, s in state.shapes.items()}
    for key, values in vector.items():
        state.masked_sum[key] = (state.masked_sum[key] + values) % state.params.modulus
    state.survivors.add(nid)


def unmask_request(state: RoundState, nid: int) -> tuple[list[int], list[int]]:
    """Return whose seed shares (survivors) and key shares (dropped) a survivor is asked for, among its links."""
    linked = set(state.links[nid])
    return sorted((linked & state.survivors) | {nid}), sorted(linked & state.dropped)


def stories_for(
    asked: Mapping[int, tuple[list[int], list[int]]], signed: Mapping[int, bytes], nid: int
) -> dict[str, list[int] | bytes]:
    """Return what unmask carries for ``nid``: each survivor in its list that signed, with the list it signed."""
    out: dict[str, list[int] | bytes] = {}
    for other in asked[nid][0]:
        if other != nid and signed.get(other):
            out[f"{STORY}{other}"], out[f"{STORY_SIGNATURE_OF}{other}"] = asked[other][0], signed[other]
    return out


def check(state: RoundState, active: set[int], stage: str) -> None:
    """Raise :class:`SecAggAbortedError` when fewer than ``threshold`` devices are left after ``stage``."""
    if len(active) < state.threshold:
        raise SecAggAbortedError(
            f"secure aggregation stopped after {stage}: {len(active)} devices left, fewer than the "
            f"reconstruction threshold {state.threshold}; the global adapter stays"
        )


def unmask(state: RoundState, shares: Mapping[int, list[bytes]]) -> dict[str, np.ndarray]:
    """Remove every mask from the sum with the rebuilt secrets; return the dequantized sum of the survivors' deltas.

    ``shares``: owner -> the shares collected for it (seed shares for a survivor, key shares for a
    dropped device). Each secret needs ``threshold`` of them.
    """
    total = dict(state.masked_sum)
    for nid in sorted(state.survivors | state.dropped):
        partners = [o for o in sorted(state.survivors) if nid in state.links.get(o, {})]
        if nid in state.dropped and not partners:
            continue  # no survivor masked with it
        secret = _rebuild(state, nid, shares.get(nid, []))
        if nid in state.survivors:  # its private mask, from its seed
            if len(secret) != SEED_BYTES:
                raise SecAggAbortedError(f"secure aggregation: device {nid}'s rebuilt seed is not {SEED_BYTES} bytes")
            total = _add(total, _mask(secret, state), -1, state.params.modulus)
            continue
        key = _private_key(state, nid, secret)
        for other in partners:  # each added +-mask(nid, other) (+ if other > nid): take it off
            pair = generate_shared_key(key, bytes_to_public_key(state.public_keys[other][0]))
            total = _add(total, _mask(pair, state), 1 if nid > other else -1, state.params.modulus)
    return _dequantize(state, total)


def _rebuild(state: RoundState, nid: int, shares: list[bytes]) -> bytes:
    if len(shares) < state.threshold:
        raise SecAggAbortedError(
            f"secure aggregation: {len(shares)} shares of device {nid}'s secret, fewer than the threshold "
            f"{state.threshold}; the global adapter stays"
        )
    try:
        return combine_shares(shares)
    except Exception as exc:  # noqa: BLE001 (pycryptodome's Shamir raises several kinds on bad shares)
        raise SecAggAbortedError(f"secure aggregation: device {nid}'s shares do not combine ({exc})") from None


def _private_key(state: RoundState, nid: int, secret: bytes) -> ec.EllipticCurvePrivateKey:
    """Return the rebuilt key of a dropped device, checked against the public key it announced at setup."""
    try:
        key = bytes_to_private_key(secret)
    except Exception:  # noqa: BLE001 (not a key at all)
        key = None
    if (
        not isinstance(key, ec.EllipticCurvePrivateKey)
        or public_key_to_bytes(key.public_key()) != (state.public_keys[nid][0])
    ):
        raise SecAggAbortedError(
            f"secure aggregation: the key rebuilt for dropped device {nid} is not the one it announced"
        )
    return key


def _mask(seed: bytes, state: RoundState) -> Vector:
    shapes = list(state.shapes.values())
    return dict(zip(state.shapes, prg_masks(seed, state.params.modulus, shapes), strict=True))


def _add(total: Vector, mask: Vector, sign: int, modulus: int) -> Vector:
    return {k: (v + sign * mask[k]) % modulus for k, v in total.items()}


def _dequantize(state: RoundState, total: Vector) -> dict[str, np.ndarray]:
    """``sum_i x_i = S 2c / L - n c`` (Flower's ``dequantize`` gives ``S 2c / L - c``; the rest is the offset).

    Each survivor's codes lie in [0, L], so an honest sum S lies in [0, n L] (below the modulus: the
    parameters ensure it). An entry above that is a mask that did not come off: a forged share (the
    self-mask seeds have no commitment to check a share against) or a forged masked vector left
    uniform noise in the sum, and the round is refused rather than signed.
    """
    p, n = state.params, len(state.survivors)
    bound = n * p.quant_levels
    for key, value in total.items():
        if (above := int(np.count_nonzero(value > bound))) > 0:
            raise SecAggAbortedError(
                f"secure aggregation: {above:,} entries of '{key:.80}' in the unmasked sum are above {bound:,} "
                f"({n} devices x {p.quant_levels:,} levels): a mask did not come off (a forged share or masked "
                "vector); the global adapter stays"
            )
    keys = list(total)
    values = dequantize([total[k] for k in keys], p.clip_range, p.quant_levels)
    return {k: v - (n - 1) * p.clip_range for k, v in zip(keys, values, strict=True)}
