"""The Gaussian mechanism over adapter deltas: the fixed-denominator mean and its noise."""

import statistics

import pytest
import torch

from server.privacy.mechanism import dp_mean, noise_std, os_generator

KEYS = ("l0.q.lora_B.weight", "l0.v.lora_B.weight")
GLOBAL = {"l0.q.lora_A.weight": torch.ones(8, 256), **{k: torch.zeros(256, 8) for k in KEYS}}


def test_the_noise_std_of_the_aggregate_is_z_c_over_m():
    z, c, m = 1.3, 0.7, 20.0
    want = z * c / m
    assert noise_std(z, c, m) == pytest.approx(want)
    stds = []
    for seed in range(30):  # many draws, each over 4096 entries, each reproducible from its seed
        out = dp_mean(GLOBAL, KEYS, [], m, z, c, torch.Generator().manual_seed(seed))
        noise = torch.cat([out[k].flatten() for k in KEYS])
        assert abs(float(noise.mean())) < 5 * want / noise.numel() ** 0.5
        stds.append(float(noise.std()))
    # 122,880 draws in all: the std's relative standard error is 1/sqrt(2n) = 0.2%
    assert statistics.mean(stds) == pytest.approx(want, rel=0.01)
    assert torch.equal(out["l0.q.lora_A.weight"], GLOBAL["l0.q.lora_A.weight"])  # not uploaded: not noised


def test_without_noise_the_aggregate_is_the_sum_over_the_expected_count_not_the_repliers():
    deltas = [{k: torch.full((256, 8), float(i)) for k in KEYS} for i in (1, 2, 3)]
    out = dp_mean(GLOBAL, KEYS, deltas, 4.0, 0.0, 1.0, os_generator())
    assert all(torch.allclose(out[k], torch.full((256, 8), 6.0 / 4.0)) for k in KEYS)


def test_the_noise_comes_fresh_from_the_os_each_round():
    a = dp_mean(GLOBAL, KEYS, [], 10.0, 1.0, 1.0, os_generator())
    b = dp_mean(GLOBAL, KEYS, [], 10.0, 1.0, 1.0, os_generator())
    assert not torch.equal(a[KEYS[0]], b[KEYS[0]])


def test_a_delta_with_other_tensors_than_the_rounds_is_refused():
    with pytest.raises(ValueError, match="uploaded tensors"):
        dp_mean(GLOBAL, KEYS, [{KEYS[0]: torch.zeros(256, 8)}], 4.0, 1.0, 1.0, os_generator())
