import numpy as np
import pytest

from shared.secagg_prg import masks

SHAPES = [(64, 8), (3,), ()]


def test_both_ends_of_a_pair_expand_the_same_secret_to_the_same_masks():
    a, b = masks(b"k" * 32, 1 << 16, SHAPES), masks(b"k" * 32, 1 << 16, SHAPES)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert [m.shape for m in a] == SHAPES


def test_seeds_that_agree_on_their_32_bit_fold_still_give_unrelated_masks():
    # Flower's pseudo_rand_gen XORs a seed's 4-byte words together: these two fold to the same 32 bits
    one = b"\x01\x00\x00\x00" * 2 + b"\0" * 24
    two = b"\0" * 32
    a, b = masks(one, 1 << 32, [(4096,)])[0], masks(two, 1 << 32, [(4096,)])[0]
    assert np.mean(a == b) < 0.01


def test_masks_are_uniform_over_the_modulus():
    m = masks(b"s" * 32, 1 << 8, [(200_000,)])[0]
    assert m.min() >= 0 and m.max() == 255
    counts = np.bincount(m, minlength=256)
    assert counts.min() > 0.8 * 200_000 / 256 and counts.max() < 1.2 * 200_000 / 256


@pytest.mark.parametrize(("seed", "modulus"), [(b"short", 1 << 16), (b"k" * 32, 1000), (b"k" * 32, 1 << 33)])
def test_a_short_seed_or_a_modulus_that_is_not_a_power_of_two_is_refused(seed, modulus):
    with pytest.raises(ValueError):
        masks(seed, modulus, SHAPES)
