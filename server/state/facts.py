"""A round's and a run's facts beyond its counts, parsed: differential privacy and secure aggregation.

Each fact has one definition of its bound here: the writer (``store.py``) cleans the round log's
``privacy`` and ``secure`` records with these parsers before it writes, the readers (``rows.py``)
parse each row's ``dp_*`` and ``secure_*`` columns with them, so a value outside its bound reads
as missing (None) on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from server.state.values import integer, within

CLIPPING = ("server", "client")
"""Where a DP run clips each update: on the coordinator on receipt, or on the device before it leaves."""
MAX_POPULATION = 2**31 - 1


class RoundPrivacy(TypedDict):
    """What a round that released under client-level DP records (the round log's ``privacy``; ``dp_*`` columns)."""

    epsilon: float | None
    """The ε spent by the run so far (cumulative after this round, at ``delta``): finite, >= 0."""
    delta: float | None
    """In (0, 1)."""
    noise_multiplier: float | None
    """z, >= 0: the noise std on the mean is z * C / m."""
    clip_norm: float | None
    """C, > 0: the L2 bound of every contribution."""
    clipped_fraction: float | None
    """The share of the round's updates whose norm exceeded C, in [0, 1]."""
    sampling_rate: float | None
    """q, each device's chance to be sampled, in (0, 1]."""
    expected_clients: float | None
    """m = q * N, > 0: the mean's fixed denominator."""
    clipping: str | None
    """One of :data:`CLIPPING`."""


class RunPrivacy(TypedDict):
    """A DP run's facts (the round log run's ``privacy``; ``dp_*`` columns of ``runs``)."""

    delta: float | None
    max_epsilon: float | None
    """>= 0; None or 0 means no limit."""
    noise_multiplier: float | None
    clip_norm: float | None
    sampling_rate: float | None
    clipping: str | None
    population: int | None
    """The devices the sampling rate was computed over, in ``[0, MAX_POPULATION]``."""


def round_privacy(values: Mapping[str, Any]) -> RoundPrivacy:
    """Parse a round's privacy facts, each to its bound (see :class:`RoundPrivacy`); a value outside it is None.

    The one definition of the bounds: the writer cleans the round log's ``privacy`` with it, the
    readers each row's ``dp_*`` columns.
    """
    return RoundPrivacy(
        epsilon=within(values.get("epsilon"), 0.0),
        delta=_delta(values.get("delta")),
        noise_multiplier=within(values.get("noise_multiplier"), 0.0),
        clip_norm=within(values.get("clip_norm"), 0.0, open_low=True),
        clipped_fraction=within(values.get("clipped_fraction"), 0.0, 1.0),
        sampling_rate=within(values.get("sampling_rate"), 0.0, 1.0, open_low=True),
        expected_clients=within(values.get("expected_clients"), 0.0, MAX_POPULATION, open_low=True),
        clipping=_clipping(values.get("clipping")),
    )


def run_privacy(values: Mapping[str, Any]) -> RunPrivacy:
    """Parse a run's privacy facts, each to its bound (see :class:`RunPrivacy`); a value outside it is None.

    z, C and q have the bounds :func:`round_privacy` gives them.
    """
    mechanism = round_privacy(values)
    return RunPrivacy(
        delta=mechanism["delta"],
        max_epsilon=within(values.get("max_epsilon"), 0.0),
        noise_multiplier=mechanism["noise_multiplier"],
        clip_norm=mechanism["clip_norm"],
        sampling_rate=mechanism["sampling_rate"],
        clipping=mechanism["clipping"],
        population=integer(values.get("population"), 0, MAX_POPULATION),
    )


ROUND_PRIVACY_KEYS = tuple(RoundPrivacy.__annotations__)
RUN_PRIVACY_KEYS = tuple(RunPrivacy.__annotations__)


def prefixed(row: Any, prefix: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """Return the ``<prefix>_<key>`` columns of a raw row by key, or None when every one is NULL (no such facts)."""
    values = {key: row[f"{prefix}_{key}"] for key in keys}
    return None if all(v is None for v in values.values()) else values


def _delta(value: Any) -> float | None:
    delta = within(value, 0.0, 1.0, open_low=True)
    return None if delta == 1.0 else delta  # δ = 1 promises nothing


def _clipping(value: Any) -> str | None:
    return value if isinstance(value, str) and value in CLIPPING else None


MAX_DEVICES = 2**31 - 1
"""Bound of a secure round's device counts and parameters (SecAgg+ itself refuses far fewer)."""


class RoundSecure(TypedDict):
    """What a round aggregated with SecAgg+ records (the round log's ``secure``; ``secure_*`` columns)."""

    survivors: int | None
    """Devices whose masked vectors are in the sum, >= 0."""
    recovered: int | None
    """Devices that dropped after sharing their keys, their masks removed through the survivors' shares."""
    dropped: int | None
    """Devices out of the protocol in all (no answer, an error, or a reply that did not parse)."""
    enrolled: int | None
    """Survivors that announced an enrolled identity (the round ran the consistency stage when > 0); which
    authorities count is each device's trust list, not the coordinator's view."""
    shares: int | None
    """The SecAgg+ share count each device's secrets were split into, >= 1."""
    threshold: int | None
    """The shares needed to rebuild a secret, >= 1."""
    clip_range: float | None
    """c > 0: every delta entry was clipped to [-c, c] before quantization."""


def round_secure(values: Mapping[str, Any]) -> RoundSecure:
    """Parse a secure round's facts, each to its bound (see :class:`RoundSecure`); a value outside it is None."""
    return RoundSecure(
        survivors=integer(values.get("survivors"), 0, MAX_DEVICES),
        recovered=integer(values.get("recovered"), 0, MAX_DEVICES),
        dropped=integer(values.get("dropped"), 0, MAX_DEVICES),
        enrolled=integer(values.get("enrolled"), 0, MAX_DEVICES),
        shares=integer(values.get("shares"), 1, MAX_DEVICES),
        threshold=integer(values.get("threshold"), 1, MAX_DEVICES),
        clip_range=within(values.get("clip_range"), 0.0, open_low=True),
    )


ROUND_SECURE_KEYS = tuple(RoundSecure.__annotations__)
