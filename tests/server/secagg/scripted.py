"""A scripted malicious coordinator: real ``secagg_mod`` devices driven message by message, through Flower's encoding.

It runs setup, share keys, confirm and collect honestly on a ring of neighbourhoods it chooses, then
tells each device whatever survivor lists it likes at consistency and unmask, forwarding whichever
signed lists it holds; :func:`open_vector` then tries to remove every mask from one device's
masked vector with the shares the devices revealed (written in review, helper 15).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, public_key_to_bytes

from client.secagg import secagg_mod
from shared.secagg_prg import keystreams
from shared.secagg_stages import (
    ACCEPTED_LIST,
    CONFIRM_SHARES,
    CONSISTENCY,
    PROOF_KEYS,
    STORY,
    STORY_SIGNATURE,
    STORY_SIGNATURE_OF,
)
from tests.client.test_secagg import ins, train
from tests.server.messages import through_flower

LEVELS, MODULUS, CLIP = 1 << 16, 1 << 32, 1.0
SHAPE = (4, 8)


def ring(ids: list[int], shares: int) -> dict[int, list[int]]:
    """Each node's neighbourhood (itself included): the ``shares`` nodes centred on it, in ``ids``' order."""
    half, n = shares // 2, len(ids)
    return {ids[p]: sorted(ids[(p + d) % n] for d in range(-half, half + 1)) for p in range(n)}


def setup_values(n: int, shares: int, threshold: int) -> dict[str, Any]:
    return {"sample_num": n, "share_num": shares, "threshold": threshold, "clipping_range": CLIP,
            "target_range": LEVELS, "mod_range": MODULUS}  # fmt: skip


class Coordinator:
    """Drives each device's ``secagg_mod`` (its own Context, its node config) with messages of its choosing."""

    def __init__(self, ids: list[int], configs: dict[int, dict], deltas: dict[int, dict[str, np.ndarray]]) -> None:
        self.ids = ids
        self.contexts = {n: Context(1, n, configs.get(n, {}), RecordDict(), {}) for n in ids}
        self.deltas = deltas
        self.sent = 0

    def send(self, nid: int, stage: str, values: dict, group: str) -> RecordDict | Exception:
        """The device's reply content, or the exception it refused with (an error reply)."""
        self.sent += 1
        msg = ins(nid, stage, values, group=group)
        msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
        try:
            reply = secagg_mod(msg, self.contexts[nid], train(self.deltas[nid]))
        except Exception as exc:  # noqa: BLE001 (what Flower would return as an error reply)
            return exc
        return through_flower(reply).content

    def run_to_collect(self, group: str, neighbours: dict[int, list[int]], setup: dict) -> tuple[dict, dict, dict]:
        """Setup, share keys, confirm and collect, honestly; return each device's keys, links and masked vector."""
        keys = {n: self._ok(self.send(n, Stage.SETUP, setup, group))[RECORD_KEY_CONFIGS] for n in self.ids}
        full = {n: [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2], *(k[p] for p in PROOF_KEYS if p in k)]
                for n, k in keys.items()}  # fmt: skip
        forward: dict[int, dict[str, list]] = {n: {Key.SOURCE_LIST: [], Key.CIPHERTEXT_LIST: []} for n in self.ids}
        for n in self.ids:
            out = self._ok(self.send(n, Stage.SHARE_KEYS, {str(o): full[o] for o in neighbours[n]}, group))
            config = out[RECORD_KEY_CONFIGS]
            for dst, text in zip(config[Key.DESTINATION_LIST], config[Key.CIPHERTEXT_LIST], strict=True):
                forward[dst][Key.SOURCE_LIST].append(n)
                forward[dst][Key.CIPHERTEXT_LIST].append(text)
        kept = {n: self._ok(self.send(n, CONFIRM_SHARES, forward[n], group))[RECORD_KEY_CONFIGS][ACCEPTED_LIST]
                for n in self.ids}  # fmt: skip
        links = {n: [s for s in kept[n] if n in kept[s]] for n in self.ids}
        masked = {}
        for n in self.ids:
            out = self._ok(self.send(n, Stage.COLLECT_MASKED_VECTORS, {Key.SOURCE_LIST: links[n]}, group))
            masked[n] = out[Key.MASKED_PARAMETERS]["w"].numpy().astype(np.int64)
        return keys, links, masked

    def consistency(self, nid: int, alive: list[int], dead: list[int], group: str) -> bytes:
        out = self._ok(
            self.send(nid, CONSISTENCY, {Key.ACTIVE_NODE_ID_LIST: alive, Key.DEAD_NODE_ID_LIST: dead}, group)
        )
        return out[RECORD_KEY_CONFIGS][STORY_SIGNATURE]

    def unmask(
        self, nid: int, alive: list[int], dead: list[int], stories: dict[int, tuple[list[int], bytes]], group: str
    ) -> dict[int, bytes] | Exception:
        """The shares ``nid`` reveals (owner -> share), or its refusal."""
        values: dict[str, Any] = {Key.ACTIVE_NODE_ID_LIST: alive, Key.DEAD_NODE_ID_LIST: dead}
        for other, (story, signature) in stories.items():
            values[f"{STORY}{other}"], values[f"{STORY_SIGNATURE_OF}{other}"] = story, signature
        out = self.send(nid, Stage.UNMASK, values, group)
        if isinstance(out, Exception):
            return out
        config = out[RECORD_KEY_CONFIGS]
        return dict(zip(config[Key.NODE_ID_LIST], config[Key.SHARE_LIST], strict=True))

    @staticmethod
    def _ok(out: RecordDict | Exception) -> RecordDict:
        assert not isinstance(out, Exception), out
        return out


def open_vector(
    x: int, masked: np.ndarray, seed_shares: list[bytes], keys_of: dict[int, bytes], pk1: dict[int, bytes],
    links: list[int],
) -> np.ndarray:  # fmt: skip
    """Remove every mask from ``x``'s masked vector: its own (the seed's) and one per linked neighbour."""
    (mask,) = keystreams(combine_shares(seed_shares), MODULUS, [SHAPE])
    codes = (masked.astype(np.int64) - mask.astype(np.int64)) % MODULUS
    for g in links:
        key = bytes_to_private_key(keys_of[g])
        assert public_key_to_bytes(key.public_key()) == pk1[g]
        (pair,) = keystreams(generate_shared_key(key, bytes_to_public_key(pk1[x])), MODULUS, [SHAPE])
        codes = (codes - (1 if x > g else -1) * pair.astype(np.int64)) % MODULUS
    return codes


def quantized(delta: np.ndarray) -> np.ndarray:
    return quantize([delta.astype(np.float64)], CLIP, LEVELS)[0].astype(np.int64)
