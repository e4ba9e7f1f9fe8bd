"""DP-FedAvg rounds: who is sampled, what one device's delta may contribute, the noised aggregate, the budget.

The coordinator's side of client-level differential privacy (``dp.*``, ``shared/config.py``),
for ``server/strategy.py``:

* **sampling**: each connected device is sampled with probability q = k / N, independently
  (Poisson sampling, as the accountant assumes; Flower's own sampler draws a fixed number,
  which the add-or-remove accountant does not cover), from the OS's random source;
* **clipping**: ``server``, each decoded delta is clipped to C; ``client``, a delta above C
  (plus float rounding) is rejected, since the device promised to clip it;
* **aggregate**: ``mechanism.dp_mean`` with the fixed denominator m = k (uniform weights);
* **budget**: ``accountant.PrivacyBudget``, checked before every round, spent after each release.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from flwr.common.logger import log

from server.privacy.accountant import BudgetExhaustedError, PrivacyBudget, Sampling, solve_noise_multiplier
from server.privacy.mechanism import clip, dp_mean, noise_std, os_generator, update_norm
from shared.config import ConfigError, DpConfig

CLIENT_CLIP_SLACK = 1e-5  # relative: the device's check is in float64 of the same decoded values


class DpRounds:
    """The DP state of one run: its sampling, its noise multiplier and the epsilon it has spent.

    Parameters
    ----------
    cfg
        The run's ``dp.*`` settings (enabled).
    fraction
        ``fraction-train``: q, the probability that a device is sampled in a round.
    rounds
        ``num-server-rounds``: what a target ``dp.epsilon`` and the ``dp.max-epsilon`` check plan for.
    """

    def __init__(self, cfg: DpConfig, fraction: float, rounds: int) -> None:
        self.cfg, self.fraction, self.rounds = cfg, fraction, rounds
        self.budget: PrivacyBudget | None = None
        self._random = secrets.SystemRandom()

    def start(
        self, connected: int, earlier: Sequence[Mapping[str, Any]], released: Sequence[int] = ()
    ) -> PrivacyBudget:
        """Fix the population, solve z if needed, account for the rounds already released; refuse an overspend.

        ``released`` are the rounds (>= 1) a resumed run released, as its verified release chain
        says (not its round log, which a crash or a hand can empty); ``earlier`` its round
        records. Each released round must have its privacy record there, else its privacy loss is
        unknown and the run refuses to go on.

        Raises
        ------
        ConfigError
            If the population is empty, a released round has no privacy record, or the planned
            rounds would spend more than ``dp.max-epsilon``.
        """
        population = self.cfg.population or connected
        if population < 1:
            raise ConfigError("dp: no devices to sample from (dp.population = 0 and none connected)")
        sampling = Sampling.of(population, self.fraction)
        z = self.cfg.noise_multiplier or solve_noise_multiplier(
            self.cfg.epsilon, self.cfg.delta, sampling.rate, self.rounds
        )
        budget = PrivacyBudget(z, self.cfg.delta, sampling, self.cfg.max_epsilon or None)
        records = {r.get("round"): r for r in earlier}
        unknown = [n for n in released if not isinstance(records.get(n, {}).get("privacy"), Mapping)]
        if unknown:
            raise ConfigError(
                f"dp: rounds {unknown[:5]} were released (the verified release chain) without a DP record in the round "
                "log; their privacy loss is unknown: restore the run's rounds.json, or start a new run"
            )
        for n in released:  # the accountant composes rounds of one mechanism: the earlier ones must be this one
            _same_mechanism(n, records[n]["privacy"], z, sampling)
        if released:
            budget.spend(len(released))
        planned = budget.projected(self.rounds - len(released))
        if budget.max_epsilon is not None and planned > budget.max_epsilon:
            fit = _rounds_that_fit(budget, budget.max_epsilon, self.rounds - len(released))
            raise ConfigError(
                f"dp: {self.rounds} rounds (z = {z:.4g}, q = {sampling.rate:.4g}) would spend epsilon {planned:.4g} "
                f"> dp.max-epsilon {budget.max_epsilon:g} at delta {self.cfg.delta:g}; {fit} more round(s) fit"
            )
        log(
            logging.INFO,
            "dp: client-level DP-FedAvg, z = %.4g, C = %g (%s clipping), q = %d/%d, noise std %.3g per entry; "
            "%d rounds spend epsilon %.4g at delta %g",
            z,
            self.cfg.clip_norm,
            self.cfg.clipping,
            sampling.expected,
            sampling.population,
            noise_std(z, self.cfg.clip_norm, sampling.expected),
            self.rounds,
            planned,
            self.cfg.delta,
        )
        self.budget = budget
        return budget

    def sample(self, nodes: Iterable[int]) -> list[int]:
        """Return each of ``nodes`` with probability q, independently (Poisson sampling)."""
        q = self._started().sampling.rate
        return [n for n in nodes if q >= 1 or self._random.random() < q]

    def contribution(self, delta: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float, bool]:
        """Return what one device's decoded delta contributes, its norm as received, and whether it was clipped.

        Raises
        ------
        ValueError
            Under client clipping, for a delta above the clip norm.
        """
        c = self.cfg.clip_norm
        if self.cfg.clipping == "client":
            norm = update_norm(delta)
            if norm > c * (1 + CLIENT_CLIP_SLACK):
                raise ValueError(f"dp.clipping = client: the delta's norm {norm:.6g} is above dp.clip-norm {c:g}")
            return {k: v.float() for k, v in delta.items()}, norm, False
        clipped, norm = clip(delta, c)
        return clipped, norm, norm > c

    def aggregate(
        self,
        global_: Mapping[str, torch.Tensor],
        keys: Iterable[str],
        deltas: Iterable[Mapping[str, torch.Tensor]],
        sensitivity: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return the new global adapter: the noised fixed-denominator mean of the contributions.

        ``sensitivity``: the L2 bound of one device's contribution where it exceeds C (SecAgg+'s
        rounding, ``server.secagg.params.sensitivity``): the noise is z times it, so z, and the
        accountant's epsilon, stay what they say.
        """
        budget = self._started()
        z, m = budget.noise_multiplier, budget.sampling.expected
        bound = max(self.cfg.clip_norm, sensitivity or 0.0)
        return dp_mean(global_, keys, deltas, m, z, bound, os_generator())

    def check_next(self) -> None:
        """Raise :class:`BudgetExhaustedError` if one more round would exceed ``dp.max-epsilon``."""
        self._started().check_next()

    def spend(self, clipped_fraction: float, server_round: int) -> dict[str, Any]:
        """Account for released round ``server_round`` and log it; return its privacy record for the round log."""
        budget = self._started()
        epsilon = budget.spend()
        log(logging.INFO, "round %d: dp: epsilon spent %.4g at delta %g (z %.4g, C %g, %.0f%% of updates clipped)",
            server_round, epsilon, self.cfg.delta, budget.noise_multiplier, self.cfg.clip_norm,
            100 * clipped_fraction)  # fmt: skip
        return {
            "epsilon": epsilon,
            "delta": self.cfg.delta,
            "noise_multiplier": budget.noise_multiplier,
            "clip_norm": self.cfg.clip_norm,
            "clipped_fraction": clipped_fraction,
            "sampling_rate": budget.sampling.rate,
            "expected_clients": float(budget.sampling.expected),
            "clipping": self.cfg.clipping,
        }

    def _started(self) -> PrivacyBudget:
        if self.budget is None:
            raise RuntimeError("dp: start() was not called before the first round")
        return self.budget


def _same_mechanism(server_round: int, record: Mapping[str, Any], z: float, sampling: Sampling) -> None:
    """Refuse a released round whose privacy record names another z or q than this start's (see ``start``)."""
    z0, q0, expected = record.get("noise_multiplier"), record.get("sampling_rate"), record.get("expected_clients")
    if _close(z0, z) and _close(q0, sampling.rate):
        return
    hint = ""
    if isinstance(expected, float) and isinstance(q0, float) and q0 > 0:
        hint = f"dp.population = {round(expected / q0)} and "  # N = k / q, as the record has them
    raise ConfigError(
        f"dp: round {server_round} was released with z = {z0!r:.12}, q = {q0!r:.12}; this start has z = {z:.6g}, "
        f"q = {sampling.rate:.6g} ({sampling.expected} of {sampling.population} devices), at which its privacy "
        f"loss would be counted: resume with {hint}the earlier dp.* settings, or start a new run"
    )


def _close(was: Any, now: float) -> bool:
    return type(was) in (int, float) and was > 0 and math.isclose(was, now, rel_tol=1e-9)


def _rounds_that_fit(budget: PrivacyBudget, cap: float, most: int) -> int:
    """Return the most rounds in [0, ``most``] whose projected epsilon stays within ``cap``, by bisection.

    Epsilon only grows with the rounds; each projection is one accountant run (~60 ms), so a scan of
    every count took 2 minutes at 2,000 planned rounds.
    """
    if budget.projected(0) > cap:
        return 0
    low, high = 0, most  # projected(low) <= cap holds throughout
    while low < high:
        mid = (low + high + 1) // 2
        if budget.projected(mid) <= cap:
            low = mid
        else:
            high = mid - 1
    return low


__all__ = ["BudgetExhaustedError", "DpRounds"]
