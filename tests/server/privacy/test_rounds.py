"""DpRounds: the coordinator's DP state of a run (population, sampling, clipping rule, budget)."""

import pytest
import torch

from server.privacy.accountant import PrivacyBudget, Sampling
from server.privacy.rounds import DpRounds
from shared.config import ConfigError, DpConfig, FleetConfig


def _rounds(rounds=5, fraction=0.1, **dp):
    return DpRounds(DpConfig(**{"noise_multiplier": 1.0, **dp}), fraction, rounds)


def test_a_run_whose_planned_rounds_would_overspend_refuses_to_start_and_says_how_many_fit():
    with pytest.raises(ConfigError, match=r"10 rounds .* would spend epsilon .* > dp\.max-epsilon 8.*2 more round"):
        DpRounds(DpConfig(noise_multiplier=1.0, max_epsilon=8.0), 1.0, 10).start(4, [])


def test_a_target_epsilon_is_solved_for_the_fleet_connected_at_the_start():
    budget = DpRounds(DpConfig(epsilon=4.0, delta=1e-4), 0.05, 6).start(400, [])
    assert budget.sampling.population == 400 and budget.sampling.expected == 20
    assert 0.99 * 4.0 <= budget.projected(6) <= 4.0


def test_a_resumed_run_counts_the_rounds_its_chain_released_and_fails_closed_without_their_record():
    spent = {"epsilon": 1.0, "noise_multiplier": 1.0, "sampling_rate": 0.1, "expected_clients": 10.0}
    records = [{"round": 0}, {"round": 1, "privacy": spent}]  # the round log; the chain says round 1 was released
    assert _rounds().start(100, records, released=[1]).rounds == 1
    with pytest.raises(ConfigError, match=r"rounds \[2\] were released \(the verified release chain\) without"):
        _rounds().start(100, records, released=[1, 2])  # round 2 signed, its record lost: loss unknown


def test_a_resumed_run_whose_population_or_noise_changed_refuses_rather_than_count_its_rounds_wrong():
    spent = {"epsilon": 1.0, "noise_multiplier": 1.0, "sampling_rate": 0.1, "expected_clients": 10.0}
    records = [{"round": 1, "privacy": spent}]  # released with q = 10/100
    with pytest.raises(ConfigError, match=r"round 1 was released with z = 1.0, q = 0.1; .* dp.population = 100 and"):
        _rounds().start(45, records, released=[1])  # 45 devices connected at the restart: q would be 4/45
    with pytest.raises(ConfigError, match="round 1 was released with z = 1.0"):
        _rounds(noise_multiplier=2.0).start(100, records, released=[1])
    assert _rounds(population=100).start(45, records, released=[1]).rounds == 1  # the hint: the earlier N


def test_devices_are_poisson_sampled_at_the_rate_q():
    dp = _rounds(fraction=0.1)
    dp.start(10_000, [])
    counts = [len(dp.sample(range(10_000))) for _ in range(5)]
    assert all(abs(c - 1000) < 150 for c in counts)  # binomial(10000, 0.1): std 30
    assert len(set(counts)) > 1  # a random count, not a fixed-size sample


def test_server_clipping_clips_and_client_clipping_rejects_a_delta_above_the_bound():
    big = {"a": torch.full((4, 4), 1.0)}  # norm 4
    server = _rounds(clip_norm=2.0)
    contribution, norm, clipped = server.contribution(big)
    assert norm == pytest.approx(4.0) and clipped
    assert float(contribution["a"].norm()) <= 2.0
    client = _rounds(clip_norm=2.0, clipping="client")
    with pytest.raises(ValueError, match=r"dp\.clipping = client: the delta's norm 4 is above dp\.clip-norm 2"):
        client.contribution(big)
    kept, _, _ = client.contribution({"a": torch.full((4, 4), 0.5)})  # norm 2: within the bound
    assert torch.equal(kept["a"], torch.full((4, 4), 0.5))


def test_spending_a_round_records_what_the_round_log_and_dashboard_show():
    dp = _rounds(clip_norm=0.5)
    dp.start(40, [])
    record = dp.spend(0.25, 1)
    assert record["epsilon"] > 0 and record["clipped_fraction"] == 0.25
    assert record | {"epsilon": 0} == {
        "epsilon": 0,
        "delta": 1e-5,
        "noise_multiplier": 1.0,
        "clip_norm": 0.5,
        "clipped_fraction": 0.25,
        "sampling_rate": 0.1,
        "expected_clients": 4.0,
        "clipping": "server",
    }


def test_how_many_rounds_fit_is_found_by_bisection_not_by_trying_every_count(monkeypatch):
    """Each projection runs the accountant (~60 ms): trying every count held a start for 2 minutes at 2,000."""
    calls = []
    projected = PrivacyBudget.projected
    monkeypatch.setattr(PrivacyBudget, "projected", lambda self, n: calls.append(n) or projected(self, n))
    with pytest.raises(ConfigError, match=r"2000 rounds .* > dp\.max-epsilon 8.*\b(\d+) more round") as refused:
        DpRounds(DpConfig(noise_multiplier=1.0, max_epsilon=8.0), 0.1, 2000).start(100, [])
    fit = int(str(refused.value).split(" more round")[0].rsplit(" ", 1)[1])
    budget = PrivacyBudget(1.0, 1e-5, Sampling.of(100, 0.1), 8.0)
    assert budget.projected(fit) <= 8.0 < budget.projected(fit + 1)  # the most that fit, exactly
    assert len(calls) <= 16  # log2(2000) + the plan's own


def test_a_run_config_planning_more_rounds_than_a_run_can_have_is_refused():
    with pytest.raises(ConfigError, match=r"'num-server-rounds' = 1000000000000000 must be in \[1, 100,000\]"):
        FleetConfig.from_run_config({"num-server-rounds": 10**15})


def test_the_noise_covers_a_contribution_bound_above_the_clip_norm():
    """SecAgg+'s rounding moves a device's contribution up to sqrt(d) 2c / L beyond C: the noise is z times that."""
    rounds = DpRounds(DpConfig(noise_multiplier=1.0, clip_norm=1.0), 1.0, 3)
    rounds.start(4, [])  # m = 4: noise std z C / m = 0.25
    zero = {"w": torch.zeros(200_000)}
    plain = rounds.aggregate(zero, ["w"], [zero])["w"].std()
    wider = rounds.aggregate(zero, ["w"], [zero], sensitivity=1.5)["w"].std()
    assert float(plain) == pytest.approx(0.25, rel=0.02) and float(wider) == pytest.approx(0.375, rel=0.02)
    assert float(rounds.aggregate(zero, ["w"], [zero], sensitivity=0.5)["w"].std()) == pytest.approx(0.25, rel=0.02)
