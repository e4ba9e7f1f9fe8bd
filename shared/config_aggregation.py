"""The coordinator's run-config sections: how updates are aggregated (``aggregation.*``) and kept private (``dp.*``).

Part of :mod:`shared.config` (which re-exports them); both sides parse them, the coordinator acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config_checks import check as _check

MIN_NOISE_MULTIPLIER = 0.1
"""Below it a DP round is no privacy worth the name (epsilon ~ 96 a round at q = 1, delta 1e-5), and the
accountants' numerics give way: z = 1e-155 accounted epsilon 0 (no noise, "within" any max-epsilon), and
Opacus' hung on the device."""
MAX_NOISE_MULTIPLIER = 1e3
"""Above it a run's noise buries any update (and a solved z there means the target cannot be met)."""

AGGREGATION_METHODS = ("fedavg", "exact", "ffa", "ties")
AGGREGATION_MODES = ("sync", "async")
ASYNC_METHODS = ("fedavg", "ffa")  # a device's change applies to a newer release's factors as it is
DELTA_ENCODINGS = ("fp16", "q8", "q4")  # shared/wire.py
# a device's Shamir split costs ~ shares^2: ~6 s of CPU at 255 (74 s at 800); both sides refuse more
MAX_SECURE_SHARES = 255


@dataclass(frozen=True)
class AggregationConfig:
    """Server-side aggregation (formulas and papers in ``server/aggregate.py``)."""

    method: str = "ties"
    """``fedavg`` (A and B averaged separately), ``exact`` (mean of B@A, SVD to rank r), ``ffa``
    (A frozen, only B trained and sent) or ``ties`` (TIES-merging of the round's B@A updates)."""
    ties_density: float = 0.2
    """TIES: fraction of each client's update entries kept (largest magnitudes), as in the paper."""
    ties_lambda: float = 1.0
    """TIES: scale of the merged update."""
    delta_encoding: str = "fp16"
    """How clients upload their delta: ``fp16``, or block-quantized ``q8`` / ``q4`` (``shared/wire.py``)."""
    max_norm_ratio: float = 5.0
    """Refuse an update whose weighted contribution (its example count over the round's median
    count, times its L2 norm) exceeds this many times the median of the other updates' (checked
    from 2 updates on): one runaway or malicious client, by its delta or by its claimed example
    count, cannot drag the global adapter."""
    min_accepted: int = 2
    """A round updates the global adapter only if at least this many updates pass validation;
    otherwise the adapter stays as it was. 2, so no round's global is one device's own update."""
    max_examples: int = 1_000_000
    """A reply's example count (its weight) must be an integer in [1, this]; a larger claim is
    refused. Weights are also bounded relative to the round: see ``max-norm-ratio``."""
    secure: bool = False
    """true: SecAgg+ (``server/secagg/``): the coordinator learns only the sum of the round's deltas
    (``fedavg``/``ffa``, ``fp16`` uplink; uniform weights); false: each delta is seen and checked."""
    secure_shares: int = 5
    """SecAgg+: each device's secrets are split into this many Shamir shares (odd, >= 3)."""
    secure_threshold: int = 3
    """SecAgg+: shares that rebuild a secret, in [shares // 2 + 1, shares]: at most shares - threshold
    neighbours of a device may drop out, and fewer than this many devices left fail the round."""
    secure_clip_range: float = 0.05
    """SecAgg+ without DP: every entry of a delta is clipped to [-c, c] and quantized from it (a
    local step of AdamW moves an entry by about ``train.lr``, so 15 steps at 1e-3 stay within
    0.05). Under client-level DP c is ``dp.clip-norm`` instead: a delta of norm <= C has no entry above it."""
    secure_max_devices: int = 1000
    """SecAgg+: most devices one round sums; with the 2^32 modulus it sets the quantization grid."""
    mode: str = "sync"
    """``sync``: rounds (every sampled device trains on the round's release, the round waits for them up
    to ``round-timeout``); ``async``: buffered asynchronous aggregation (FedBuff, ``server/async_rounds.py``):
    every device trains whenever it is free on the newest release, and each ``buffer-size`` arrived
    updates, weighted down by their staleness, make the next signed release."""
    buffer_size: int = 3
    """async: accepted updates that make one release (FedBuff's K). 3, not 2: a device that answers at once is
    in every buffer, and of two updates the norm rule refuses the one more than ``max-norm-ratio`` x the
    other: a zero delta, sent at once, vetoed every release. From 3 on, fewer than half of a buffer cannot."""
    max_staleness: int = 4
    """async: an update of a release this many rounds older than the newest is still counted (weighted
    1 / sqrt(1 + staleness)); an older one is rejected, with its staleness as the reason."""

    workers: int = 1
    """exact / ties: Ray workers that aggregate a shard of the modules each, in parallel (``server/shards.py``);
    1: in this process. Needs Ray on the coordinator (the ``sim`` extra has it)."""
    ray_address: str = ""
    """Where ``workers`` run: empty: a local Ray on this machine (or the Ray this process already runs);
    otherwise ``ray.init``'s address: ``auto`` (a cluster this node is part of) or ``ray://<head>:10001``."""

    def __post_init__(self) -> None:
        methods = AGGREGATION_METHODS
        _check(self.method in methods, "aggregation.method", self.method, f"must be one of {methods}")
        _check(0 < self.ties_density <= 1, "aggregation.ties-density", self.ties_density, "must be in (0, 1]")
        _check(self.ties_lambda > 0, "aggregation.ties-lambda", self.ties_lambda, "must be > 0")
        encoding, encodings = self.delta_encoding, DELTA_ENCODINGS
        _check(encoding in encodings, "aggregation.delta-encoding", encoding, f"must be one of {encodings}")
        _check(self.max_norm_ratio > 1, "aggregation.max-norm-ratio", self.max_norm_ratio, "must be > 1")
        _check(self.min_accepted >= 1, "aggregation.min-accepted", self.min_accepted, "must be >= 1")
        _check(self.max_examples >= 1, "aggregation.max-examples", self.max_examples, "must be >= 1")
        _check(self.secure_clip_range > 0, "aggregation.secure-clip-range", self.secure_clip_range, "must be > 0")
        _check(self.mode in AGGREGATION_MODES, "aggregation.mode", self.mode, f"must be one of {AGGREGATION_MODES}")
        _check(1 <= self.buffer_size <= 100_000, "aggregation.buffer-size", self.buffer_size, "must be in [1, 100000]")
        _check(0 <= self.max_staleness <= 1000, "aggregation.max-staleness", self.max_staleness, "must be in [0, 1000]")
        _check(1 <= self.workers <= 256, "aggregation.workers", self.workers, "must be in [1, 256]")
        why = "shards exact and ties only (fedavg and ffa stream each update at once): set aggregation.workers = 1"
        _check(self.workers == 1 or self.method in ("exact", "ties"), "aggregation.workers", self.workers, why)
        address_ok = len(self.ray_address) <= 256 and not any(c.isspace() for c in self.ray_address)
        _check(address_ok, "aggregation.ray-address", self.ray_address, "must be <= 256 characters, no spaces")
        if self.mode == "async":
            self._check_async()
        if self.secure:
            why = "cannot run under secure aggregation: it is not a sum, and only sums are revealed"
            _check(self.method in DP_METHODS, "aggregation.method", self.method, f"{why}; use one of {DP_METHODS}")
            why = "must be fp16 under secure aggregation (devices quantize for the protocol themselves)"
            _check(self.delta_encoding == "fp16", "aggregation.delta-encoding", self.delta_encoding, why)

    def _check_async(self) -> None:
        """Asynchronous rounds need an update that still applies to a newer release, and see each update."""
        why = (
            "cannot run with aggregation.mode = async: its releases are re-factored by SVD every round, so a stale "
            f"device's factor change does not apply to a newer release's factors; use one of {ASYNC_METHODS}"
        )
        _check(self.method in ASYNC_METHODS, "aggregation.method", self.method, why)
        why = "must be false with aggregation.mode = async (SecAgg+ sums a round of devices that train together)"
        _check(not self.secure, "aggregation.secure", self.secure, why)
        rule = "must be <= aggregation.buffer-size with aggregation.mode = async (a release is made of one buffer)"
        _check(self.min_accepted <= self.buffer_size, "aggregation.min-accepted", self.min_accepted, rule)


DP_CLIPPING = ("server", "client")
DP_LEVELS = ("client", "record")
DP_METHODS = ("fedavg", "ffa")  # a clipped, noised mean; ties and exact are not a sum of clipped updates


@dataclass(frozen=True)
class DpConfig:
    """Client-level differential privacy, DP-FedAvg (McMahan et al., 2018, arXiv 1710.06963); ``server/privacy/``.

    On when ``noise-multiplier`` or ``epsilon`` is above 0. Each round's devices are Poisson-sampled with
    probability ``fraction-train``, each device's delta is clipped to L2 norm ``clip-norm`` = C, and
    the new global is ``global + sum(clipped) / m + N(0, (z C / m)^2)`` with m = the expected number of
    sampled devices. Weights are uniform: an example-count weight is a device's own claim, and it
    would scale that device's influence (the sensitivity) beyond C.
    """

    noise_multiplier: float = 0.0
    """z, the noise's standard deviation in units of C / m; 0 and ``epsilon`` 0: DP off."""
    epsilon: float = 0.0
    """A target: z is solved so that ``num-server-rounds`` rounds spend this epsilon at ``delta``."""
    delta: float = 1e-5
    """The delta of every epsilon reported; keep it below 1 / population."""
    clip_norm: float = 1.0
    """C, the L2 norm bound of every device's delta (all uploaded tensors together)."""
    clipping: str = "server"
    """``server``: the coordinator clips each decoded delta; ``client``: each device clips before it
    uploads (what secure aggregation needs) and the coordinator rejects a delta above C."""
    max_epsilon: float = 0.0
    """Refuse to start a run, or stop it before a round, when its epsilon would exceed this; 0: no limit."""
    population: int = 0
    """N, the fleet the sample is drawn from; 0: the devices connected when round 1 starts."""
    level: str = "client"
    """``client``: DP-FedAvg over the fleet (a device's whole dataset is protected); ``record``: each
    device runs DP-SGD with Opacus (one example is protected; ``noise-multiplier`` and ``clip-norm``
    are then per example, ``max-epsilon`` a per-device limit; ``client/record_dp.py``)."""

    @property
    def enabled(self) -> bool:
        """Whether the run is differentially private."""
        return self.noise_multiplier > 0 or self.epsilon > 0

    def __post_init__(self) -> None:
        z, low, high = self.noise_multiplier, MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
        _check(z == 0 or low <= z <= high, "dp.noise-multiplier", z, f"must be 0 (off) or in [{low:g}, {high:g}]")
        _check(self.epsilon >= 0, "dp.epsilon", self.epsilon, "must be >= 0")
        both = self.noise_multiplier > 0 and self.epsilon > 0
        _check(not both, "dp.epsilon", self.epsilon, "and dp.noise-multiplier are exclusive: set one")
        _check(0 < self.delta < 1, "dp.delta", self.delta, "must be in (0, 1)")
        _check(self.clip_norm > 0, "dp.clip-norm", self.clip_norm, "must be > 0")
        _check(self.clipping in DP_CLIPPING, "dp.clipping", self.clipping, f"must be one of {DP_CLIPPING}")
        _check(self.max_epsilon >= 0, "dp.max-epsilon", self.max_epsilon, "must be >= 0")
        _check(self.population >= 0, "dp.population", self.population, "must be >= 0")
        _check(self.level in DP_LEVELS, "dp.level", self.level, f"must be one of {DP_LEVELS}")
        record_target = self.level == "record" and self.epsilon > 0
        _check(
            not record_target,
            "dp.epsilon",
            self.epsilon,
            "is not solved per device: with dp.level = record set dp.noise-multiplier",
        )
