"""The masks of secure aggregation: a keystream both ends of a pair derive from the same secret.

SecAgg+ (Bell et al., CCS 2020) hides each device's vector under a private mask and one mask
per neighbour, expanded from seeds by a pseudo-random generator that device and coordinator (when
it removes a dropped device's masks) must run identically. Flower's ``pseudo_rand_gen`` folds the
seed to 32 bits and draws with NumPy's Mersenne Twister: 2^32 candidates per mask, which a curious
coordinator can search. Here the seed (a 32-byte private seed, or an ECDH shared key) is expanded
by HKDF-SHA256 to a ChaCha20 key, and the masks are ChaCha20's keystream read as little-endian
uint32 (``cryptography``'s implementations; no primitive of our own). With a power-of-two modulus
M <= 2^32 the reduction mod M keeps them uniform.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO = b"fleetlora secagg+ mask v1"
MIN_SEED_BYTES = 16


def masks(seed: bytes, modulus: int, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Return one int64 mask array per shape, uniform in [0, modulus), expanded from ``seed``.

    Raises
    ------
    ValueError
        For a seed shorter than 16 bytes, or a modulus that is not a power of two in [2, 2^32].
    """
    return [m.astype(np.int64) for m in keystreams(seed, modulus, shapes)]


def keystreams(seed: bytes, modulus: int, shapes: Sequence[tuple[int, ...]]) -> Iterator[np.ndarray]:
    """Yield :func:`masks`'s arrays as uint32, one shape at a time (a device holds one tensor's mask at once).

    Raises
    ------
    ValueError
        As :func:`masks`, before the first array.
    """
    if len(seed) < MIN_SEED_BYTES:
        raise ValueError(f"a mask seed must have at least {MIN_SEED_BYTES} bytes, got {len(seed)}")
    if not (2 <= modulus <= 1 << 32 and modulus & (modulus - 1) == 0):
        raise ValueError(f"the modulus must be a power of two in [2, 2^32], got {modulus}")
    return _keystreams(seed, np.uint32(modulus - 1), shapes)


def _keystreams(seed: bytes, low: np.uint32, shapes: Sequence[tuple[int, ...]]) -> Iterator[np.ndarray]:
    key = HKDF(algorithm=SHA256(), length=32, salt=None, info=INFO).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    for shape in shapes:
        words = np.frombuffer(stream.update(bytes(4 * math.prod(shape))), dtype="<u4")
        yield np.bitwise_and(words, low).astype(np.uint32, copy=False).reshape(shape)  # mod M: M divides 2^32
