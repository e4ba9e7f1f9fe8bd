"""The run's privacy budget: Flower's RDP accountant checked against an independent one (Opacus)."""

import math

import pytest
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
from opacus.accountants.analysis import rdp as opacus_rdp

from server.privacy.accountant import BudgetExhaustedError, PrivacyBudget, Sampling, solve_noise_multiplier
from shared.config import ConfigError, DpConfig


def _opacus_epsilon(q, z, rounds, delta):
    """Opacus' own RDP analysis of the Poisson-subsampled Gaussian (Mironov et al. 2019), same orders."""
    orders = [float(o) for o in DEFAULT_RDP_ORDERS]
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders)
    return opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


@pytest.mark.parametrize(
    ("population", "expected", "z", "rounds", "delta"),
    [
        (1000, 10, 1.1, 100, 1e-5),  # 1% of the fleet per round
        (400, 20, 1.03, 6, 1e-3),  # the privacy benchmark's shape
        (60000, 256, 1.1, 14062, 1e-5),  # DP-SGD on MNIST: q = 256/60000, 60 epochs (Abadi et al. 2016 scale)
        (50, 50, 4.0, 20, 1e-5),  # every device every round: no amplification
    ],
)
def test_epsilon_matches_an_independent_accountant_within_one_percent(population, expected, z, rounds, delta):
    budget = PrivacyBudget(z, delta, Sampling(population, expected), None)
    spent = budget.spend(rounds)
    assert budget.rounds == rounds
    assert spent == pytest.approx(_opacus_epsilon(expected / population, z, rounds, delta), rel=0.01)


def test_a_solved_noise_multiplier_spends_the_target_epsilon_and_no_more():
    sampling = Sampling.of(400, 0.05)
    for target in (1.0, 4.0, 8.0):
        z = solve_noise_multiplier(target, 1e-3, sampling.rate, 6)
        spent = PrivacyBudget(z, 1e-3, sampling, None).projected(6)
        assert target * 0.99 <= spent <= target
    # more privacy costs more noise
    zs = [solve_noise_multiplier(e, 1e-3, sampling.rate, 6) for e in (1.0, 4.0, 8.0)]
    assert zs[0] > zs[1] > zs[2]


def test_the_budget_refuses_the_round_that_would_exceed_max_epsilon():
    budget = PrivacyBudget(1.0, 1e-5, Sampling(4, 4), max_epsilon=8.0)
    for _ in range(2):  # epsilon 4.73, then 7.08
        budget.check_next()
        budget.spend()
    with pytest.raises(BudgetExhaustedError, match="would spend epsilon 9.01 > dp.max-epsilon 8"):
        budget.check_next()
    assert budget.rounds == 2  # the refused round was not spent


def test_sampling_rounds_the_fraction_to_a_count_of_devices():
    assert Sampling.of(400, 0.05) == Sampling(400, 20)
    assert Sampling.of(3, 0.01).expected == 1  # at least one device
    with pytest.raises(ValueError, match="population"):
        Sampling(3, 4)


def test_an_epsilon_the_numerics_cannot_give_is_infinite_not_zero():
    """z = 1e-155 (no noise at all) accounted epsilon 0.0, "within" any dp.max-epsilon: now infinite, refused."""
    budget = PrivacyBudget(1e-155, 1e-5, Sampling(5, 3), max_epsilon=1.0)
    assert budget.projected(1) == math.inf
    with pytest.raises(BudgetExhaustedError, match="would spend epsilon inf"):
        budget.check_next()
    assert budget.spend() == math.inf and budget.epsilon == math.inf


@pytest.mark.parametrize("z", [1e-155, 1e-6, 0.09, 1001.0])
def test_a_noise_multiplier_outside_the_meaningful_range_is_refused_by_the_run_config(z):
    with pytest.raises(ConfigError, match=r"'dp\.noise-multiplier' = .* must be 0 \(off\) or in \[0\.1, 1000\]"):
        DpConfig(noise_multiplier=z)
