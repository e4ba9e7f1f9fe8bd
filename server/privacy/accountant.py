"""The privacy budget of a run: Flower's RDP accountant over DP-FedAvg rounds, and z for a target epsilon.

Each round that releases an adapter is one sampled Gaussian mechanism with noise multiplier z
(noise std z C / m on a mean of sensitivity C / m). The devices of a round are Poisson-sampled
with probability q = k / N (``server/strategy.py``), so a round is a Poisson-subsampled
Gaussian under add-or-remove-one-device adjacency (Mironov et al., 2019, arXiv 1908.10530);
when every device of the fleet takes part (q = 1) there is no amplification. Composition over
rounds and the conversion to (epsilon, delta) are Flower's ``RdpAccountant`` (Google's
``dp-accounting`` behind it); solving for z is ``dp_accounting.mechanism_calibration``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.rdp import RdpAccountant as DpAccountingRdp
from flwr.serverapp import GaussianPrivacyEvent, PrivacyConfig, RdpAccountant
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from shared.config_aggregation import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER


@contextlib.contextmanager
def _quiet_accounting() -> Iterator[None]:
    """Silence dp-accounting's per-order warnings ("failed to converge ... Excluding this order").

    At small q it logs hundreds per epsilon; the order is dropped from the minimum, which only
    makes the bound looser, and an operator can do nothing about it.
    """
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


class BudgetExhaustedError(RuntimeError):
    """Another round would spend more than ``dp.max-epsilon``."""


@dataclass(frozen=True)
class Sampling:
    """How a round's devices are drawn: each of ``population`` with probability ``expected / population``."""

    population: int
    expected: int

    def __post_init__(self) -> None:
        if not 1 <= self.expected <= self.population:
            raise ValueError(f"expected sample {self.expected} must be in [1, population {self.population}]")

    @property
    def rate(self) -> float:
        """q, the probability that a device is sampled in a round."""
        return self.expected / self.population

    @classmethod
    def of(cls, population: int, fraction: float) -> Sampling:
        """Return the sampling of ``fraction`` of ``population``, rounded to k / N (at least one device)."""
        return cls(population, min(population, max(1, round(fraction * population))))


class PrivacyBudget:
    """The epsilon a run has spent at ``delta``, round by round, with an optional limit.

    Parameters
    ----------
    noise_multiplier
        z of every round.
    delta
        The delta every epsilon is reported at.
    sampling
        The population and the expected sample of every round.
    max_epsilon
        Refuse a round that would take epsilon above this (None: no limit).
    """

    def __init__(self, noise_multiplier: float, delta: float, sampling: Sampling, max_epsilon: float | None) -> None:
        method = SamplingMethod.POISSON if sampling.rate < 1 else SamplingMethod.NO_AMPLIFICATION
        self.config = PrivacyConfig(delta, sampling.population, NeighboringRelation.ADD_OR_REMOVE_ONE, method)
        self.noise_multiplier, self.sampling, self.max_epsilon = noise_multiplier, sampling, max_epsilon
        self.event = GaussianPrivacyEvent(noise_multiplier, sampling.expected, sampling.population)
        self._accountant = RdpAccountant(self.config)

    @property
    def rounds(self) -> int:
        """Rounds released so far."""
        return self._accountant.num_releases

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first release)."""
        if not self.rounds:
            return 0.0
        with _quiet_accounting():
            return _fail_closed(self._accountant.get_epsilon(self.config.target_delta))

    def projected(self, rounds: int) -> float:
        """Return the epsilon after ``rounds`` more releases, without spending them."""
        if rounds <= 0:
            return self.epsilon
        ahead = RdpAccountant(self.config)
        ahead.compose(self.event, self.rounds + rounds)
        with _quiet_accounting():
            return _fail_closed(ahead.get_epsilon(self.config.target_delta))

    def check_next(self) -> None:
        """Raise :class:`BudgetExhaustedError` if one more round would exceed ``max_epsilon``."""
        if self.max_epsilon is not None and self.projected(1) > self.max_epsilon:
            raise BudgetExhaustedError(
                f"one more round would spend epsilon {self.projected(1):.4g} > dp.max-epsilon "
                f"{self.max_epsilon:g} (at delta {self.config.target_delta:g}; spent {self.epsilon:.4g} "
                f"over {self.rounds} rounds)"
            )

    def spend(self, rounds: int = 1) -> float:
        """Account for ``rounds`` released rounds; return the epsilon spent so far."""
        self._accountant.compose(self.event, rounds)
        return self.epsilon


def _fail_closed(epsilon: float) -> float:
    """Return ``epsilon``, or infinity where, after a release, it is not finite and above 0 (the numerics failed)."""
    return epsilon if math.isfinite(epsilon) and epsilon > 0 else math.inf


def solve_noise_multiplier(epsilon: float, delta: float, sampling_rate: float, rounds: int) -> float:
    """Return the smallest z for which ``rounds`` rounds at rate q spend at most ``epsilon`` at ``delta``.

    Raises
    ------
    ValueError
        If no z up to :data:`MAX_NOISE_MULTIPLIER` reaches the target.
    """
    if not (epsilon > 0 and 0 < delta < 1 and 0 < sampling_rate <= 1 and rounds >= 1):
        raise ValueError(f"cannot solve z for epsilon {epsilon}, delta {delta}, q {sampling_rate}, {rounds} rounds")

    def event(z: float) -> dp_event.DpEvent:
        gaussian = dp_event.GaussianDpEvent(z)
        one = gaussian if sampling_rate >= 1 else dp_event.PoissonSampledDpEvent(sampling_rate, gaussian)
        return dp_event.SelfComposedDpEvent(one, rounds)

    try:
        with _quiet_accounting():
            z = mechanism_calibration.calibrate_dp_mechanism(
                DpAccountingRdp,
                event,
                epsilon,
                delta,
                mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0),
                tol=1e-4,
            )
    except mechanism_calibration.NoBracketIntervalFoundError as exc:
        raise ValueError(f"no noise multiplier reaches epsilon {epsilon} at delta {delta} in {rounds} rounds") from exc
    if not MIN_NOISE_MULTIPLIER <= z <= MAX_NOISE_MULTIPLIER:
        raise ValueError(
            f"the noise multiplier for epsilon {epsilon} would be {z:.4g}, outside [{MIN_NOISE_MULTIPLIER:g}, "
            f"{MAX_NOISE_MULTIPLIER:g}]"
        )
    return float(z)
