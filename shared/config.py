"""One typed, validated view of the run configuration.

Flower hands every app a flat ``dict`` (``context.run_config``) whose defaults live in
``[tool.flwr.app.config]`` of ``pyproject.toml``. Both sides build a :class:`FleetConfig`
from it once, so a wrong key or value fails early with a message that names it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A run-config key is unknown or its value is out of range."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters (Hu et al., 2021, arXiv 2106.09685): W' = W + (alpha / r) * B @ A."""

    rank: int = 8
    """r, the rank of the update; 8 on all linear layers is 2.44M parameters for SmolLM2-135M."""
    alpha: int = 16
    """Scale numerator; the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA path; 0 keeps training deterministic for a given seed."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers that get an adapter (all seven kinds of a llama block by default)."""
    device_ranks: tuple[str, ...] = ()
    """Simulation only: virtual device i trains at rank ``device_ranks[i % n]`` (each in [1, rank]); empty: all at
    ``rank``. A real device's own node config ``lora-rank`` decides for it (``client/capability.py``)."""

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank", self.rank, "must be >= 1")
        ok = all(len(r) <= 6 and r.isascii() and r.isdigit() and 1 <= int(r) <= self.rank for r in self.device_ranks)
        why = f"must be integers in [1, lora.rank = {self.rank}]"
        _check(ok, "lora.device-ranks", ",".join(self.device_ranks)[:80], why)
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target-modules", self.target_modules, "must name a layer")


DTYPES = ("auto", "float32", "bfloat16")
MAX_SLOWDOWN = 100


def _number_in(text: str, low: float, high: float) -> bool:
    """Whether ``text`` (at most 8 ASCII characters) is a decimal number in [low, high]."""
    if len(text) > 8 or not text.isascii() or not text.replace(".", "", 1).isdigit():
        return False
    return low <= float(text) <= high


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a device, per round."""

    steps: int = 15
    """Optimizer steps per round on each client."""
    batch_size: int = 4
    """Examples per step."""
    lr: float = 1e-3
    """AdamW learning rate (fresh optimizer each round: no optimizer state travels)."""
    max_seq_len: int = 128
    """Longer examples are cut to this many tokens."""
    micro_batch_size: int = 0
    """Split each step's batch into micro-batches of this many examples and accumulate their
    gradients (same update, less activation memory); 0 = the whole batch at once."""
    gradient_checkpointing: int = 0
    """1: recompute each block's activations in the backward pass instead of keeping them (less
    memory, ~30% more compute); 0: keep them."""
    device_slowdown: tuple[str, ...] = ()
    """Simulation only: virtual device i waits (k - 1) x its training time after training, k =
    ``device_slowdown[i % n]`` in [1, 100] (``client/slowdown.py``): a straggler by construction for
    asynchronous aggregation; a real device's node config ``slowdown`` decides for it. Empty: none."""
    dtype: str = "auto"
    """Compute dtype of the frozen base: ``auto`` takes bfloat16 only on CPUs with native bf16
    (AVX512-BF16 / AMX); elsewhere bf16 is emulated and measured 6x (forward) to 70x (backward)
    slower than float32, so ``auto`` takes float32 there."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _check(self.batch_size >= 1, "train.batch-size", self.batch_size, "must be >= 1")
        _check(0 < self.lr < 1, "train.lr", self.lr, "must be in (0, 1)")
        _check(self.micro_batch_size >= 0, "train.micro-batch-size", self.micro_batch_size, "must be >= 0")
        _check(
            self.gradient_checkpointing in (0, 1), "train.gradient-checkpointing", self.gradient_checkpointing, "0 or 1"
        )
        _check(self.max_seq_len >= 16, "train.max-seq-len", self.max_seq_len, "must be >= 16")
        _check(self.dtype in DTYPES, "train.dtype", self.dtype, f"must be one of {DTYPES}")
        ok = all(_number_in(k, 1, MAX_SLOWDOWN) for k in self.device_slowdown)
        why = f"must be numbers in [1, {MAX_SLOWDOWN}]"
        _check(ok, "train.device-slowdown", ",".join(self.device_slowdown)[:80], why)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation on a device."""

    max_examples: int = 64
    """Evaluate on at most this many held-out examples (the first ones of the file); at ~13
    response tokens each, 64 examples score ~850 tokens per client, and keep evaluation (run
    every round on every client) from costing more than training."""
    batch_size: int = 32
    """Examples per forward pass."""

    def __post_init__(self) -> None:
        _check(self.max_examples >= 1, "eval.max-examples", self.max_examples, "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch-size", self.batch_size, "must be >= 1")


AGGREGATION_METHODS = ("fedavg", "exact", "ffa", "ties")
AGGREGATION_MODES = ("sync", "async")
ASYNC_METHODS = ("fedavg", "ffa")  # a device's change applies to a newer release's factors as it is
DELTA_ENCODINGS = ("fp16", "q8", "q4")  # shared/wire.py


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
    buffer_size: int = 2
    """async: accepted updates that make one release (FedBuff's K)."""
    max_staleness: int = 4
    """async: an update of a release this many rounds older than the newest is still counted (weighted
    1 / sqrt(1 + staleness)); an older one is rejected, with its staleness as the reason."""

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
        _check(self.noise_multiplier >= 0, "dp.noise-multiplier", self.noise_multiplier, "must be >= 0")
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


BASE_FORMATS = ("int4", "float")


@dataclass(frozen=True)
class BaseConfig:
    """How devices get the base model (``server/quantize.py``, ``server/distribute.py``, ``client/fetch.py``)."""

    format: str = "int4"
    """``int4``: the server quantizes the base once and devices download it from the artifact
    service, then train LoRA on the frozen 4-bit layers; ``float``: every device loads ``model`` itself."""
    address: str = "127.0.0.1:50061"
    """The artifact service: the server listens here, devices fetch from here (HOST:PORT)."""
    store: str = ""
    """Server: the artifact store (base + adapter releases); empty means ``<output-dir>/store``."""
    serve: int = 1
    """Server: 1, the ServerApp serves the store on ``address`` for the run; 0, a separate
    ``fleetlora serve-artifacts`` process serves it (a fleet: it outlives a coordinator restart)."""
    tls_cert: str = ""
    """Server: PEM certificate of the artifact service (with ``tls-key``: TLS on); devices then
    need the CA in their node config ``ca-file``. Empty: plaintext (simulation on loopback)."""
    tls_key: str = ""
    """Server: the PEM private key of ``tls-cert``."""
    tls_ca: str = ""
    """Server: the fleet CA whose device certificates the artifact service admits (mutual TLS);
    empty means ``ca.pem`` beside ``tls-cert``, where ``fleetlora certs`` puts it."""

    def __post_init__(self) -> None:
        _check(self.serve in (0, 1), "base.serve", self.serve, "must be 0 or 1")
        _check(bool(self.tls_cert) == bool(self.tls_key), "base.tls-cert", self.tls_cert, "needs base.tls-key too")
        _check(self.format in BASE_FORMATS, "base.format", self.format, f"must be one of {BASE_FORMATS}")
        host, _, port = self.address.rpartition(":")
        valid = bool(host) and port.isdigit() and 0 < int(port) < 65536
        _check(valid, "base.address", self.address, "must be HOST:PORT")


@dataclass(frozen=True)
class SigningConfig:
    """Signed releases (``shared/release.py``); relative paths are resolved against the project folder."""

    key: str = ".fleetlora/keys/server.key"
    """Server: the Ed25519 private key (mode 0600; ``fleetlora keys generate`` creates it)."""
    trust_file: str = ".fleetlora/keys/server.key.pub"
    """The trust list of the simulation's virtual devices, which the demo (their operator) hands them
    through their own settings (``client/device.py``). A device never reads it from the run config:
    whoever submits a run must not choose which keys devices trust."""


@dataclass(frozen=True)
class StateConfig:
    """The coordinator's state store (``server/state/``), which the dashboard reads."""

    db: str = ""
    """Server: the SQLite file of runs, rounds and client results, written as the run goes (one
    file serves many runs); empty means ``<output-dir>/state.sqlite``."""

    def __post_init__(self) -> None:
        _check(not self.db.endswith(("/", "\\")), "state.db", self.db, "must name a file, not a folder")


@dataclass(frozen=True)
class FleetConfig:
    """The whole run configuration, as both the server and the clients see it."""

    model: str = "smollm2-135m-instruct"
    """Base model: the embedded alias, a Hugging Face folder, a ``.gguf`` file, or a hub id."""
    data_dir: str = "simulations/data/wordnet"
    """Folder with one sub-folder per topic holding ``train.jsonl`` and ``heldout.jsonl``."""
    topics: tuple[str, ...] = ("noun.animal", "noun.food", "noun.artifact", "verb.motion")
    """Simulation: client ``partition-id`` i trains on ``topics[i % len(topics)]``."""
    output_dir: str = "outputs"
    """Where the server writes the final adapter and the round log."""
    run_name: str = "demo"
    """Sub-folder of ``output_dir`` for this run."""
    run_id: str = ""
    """Stable identity of the run: its releases live in ``<store>/adapter/<run-id>/``. Empty: a
    new id per ``flwr run`` (``<run-name>-<Flower run id>``). Set, a restarted ``flwr run`` with
    the same ``run-id`` resumes after the last signed release of that folder (``server/resume.py``)."""
    round_timeout: float = 3600.0
    """Seconds the server waits for replies in each train or evaluate phase; a device that has
    not replied by then is logged and left out of that round, which goes on with the others."""
    fraction_train: float = 1.0
    """Fraction of the connected devices sampled to train each round (at least ``min-clients``)."""
    fraction_evaluate: float = 1.0
    """Fraction of the connected devices sampled to evaluate each round; 0 skips federated evaluation."""
    seed: int = 0
    """Seeds the initial adapter and each client's data order."""
    num_server_rounds: int = 3
    """Federated rounds."""
    min_clients: int = 4
    """A round waits for this many connected clients and fails with fewer."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    state: StateConfig = field(default_factory=StateConfig)
    dp: DpConfig = field(default_factory=DpConfig)

    def __post_init__(self) -> None:
        _check(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, "must be >= 1")
        _check(self.min_clients >= 1, "min-clients", self.min_clients, "must be >= 1")
        _check(self.round_timeout > 0, "round-timeout", self.round_timeout, "must be > 0 seconds")
        _check(0 < self.fraction_train <= 1, "fraction-train", self.fraction_train, "must be in (0, 1]")
        _check(0 <= self.fraction_evaluate <= 1, "fraction-evaluate", self.fraction_evaluate, "must be in [0, 1]")
        _check(all(c.isalnum() or c in "._-" for c in self.run_id), "run-id", self.run_id, "must be [A-Za-z0-9._-]")
        _check(len(self.topics) >= 1, "topics", self.topics, "must name at least one topic")
        method = self.aggregation.method
        why = (
            f"cannot run with differential privacy (dp.*): its aggregate is not a sum of clipped updates, so no "
            f"clip bound limits one device's influence on it; use one of {DP_METHODS}"
        )
        client_level = self.dp.enabled and self.dp.level == "client"
        _check(not client_level or method in DP_METHODS, "aggregation.method", method, why)
        why = "must be sync with client-level DP (dp.*): its accountant counts rounds of Poisson-sampled devices"
        _check(not client_level or self.aggregation.mode == "sync", "aggregation.mode", self.aggregation.mode, why)
        if self.dp.enabled and self.dp.level == "record":  # Opacus' per-example hooks see one whole batch
            rule = "must be 0 with dp.level = record"
            _check(self.train.micro_batch_size == 0, "train.micro-batch-size", self.train.micro_batch_size, rule)
            checkpointing = self.train.gradient_checkpointing
            _check(checkpointing == 0, "train.gradient-checkpointing", checkpointing, rule)
        if self.aggregation.secure:
            self._check_secure()
        if self.dp.enabled and self.dp.population:
            _check(self.dp.delta < 1 / self.dp.population, "dp.delta", self.dp.delta, "must be < 1 / dp.population")

    def _check_secure(self) -> None:
        """Secure aggregation composes with client-level DP only with clipping on the device."""
        dp = self.dp
        if dp.enabled:
            rule = "must be client under secure aggregation: the coordinator never sees a delta to clip"
            _check(dp.level == "record" or dp.clipping == "client", "dp.clipping", dp.clipping, rule)

    @property
    def secure_clip_range(self) -> float:
        """c, the range SecAgg+ quantizes each entry from: ``dp.clip-norm`` under client-level DP, else its own."""
        client_dp = self.dp.enabled and self.dp.level == "client"
        return self.dp.clip_norm if client_dp else self.aggregation.secure_clip_range

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FleetConfig:
        """Build and validate from Flower's flat run config (``"train.steps"`` style keys).

        Raises
        ------
        ConfigError
            For an unknown key (with the closest known one) or a value of the wrong type or range.
        """
        known = _flat_fields(cls)
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in known:
                hint = difflib.get_close_matches(key, list(known), n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"unknown run-config key '{key}'{suggestion}; known keys: {', '.join(sorted(known))}")
            section_cls, attr, kind = known[key]
            converted = _convert(key, value, kind)
            if section_cls is None:
                top[attr] = converted
            else:
                sections.setdefault(section_cls, {})[attr] = converted
        nested = {name: sub_cls(**sections.get(name, {})) for name, sub_cls in _SECTIONS.items()}
        return cls(**top, **nested)


_SECTIONS: dict[str, type] = {
    "lora": LoraConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "aggregation": AggregationConfig,
    "signing": SigningConfig,
    "base": BaseConfig,
    "state": StateConfig,
    "dp": DpConfig,
}


def _flat_fields(cls: type) -> dict[str, tuple[str | None, str, Any]]:
    """Map every flat key (``train.batch-size``) to (section, attribute, type)."""
    out: dict[str, tuple[str | None, str, Any]] = {}
    for f in fields(cls):
        if f.name in _SECTIONS:
            for sub in fields(_SECTIONS[f.name]):
                out[f"{f.name}.{sub.name.replace('_', '-')}"] = (f.name, sub.name, sub.type)
        else:
            out[f.name.replace("_", "-")] = (None, f.name, f.type)
    return out


def _convert(key: str, value: Any, kind: Any) -> Any:
    """Convert a TOML value to the field's type (annotations are strings under __future__)."""
    kind = str(kind)
    if kind.startswith("tuple"):
        if not isinstance(value, str):
            raise ConfigError(f"run-config '{key}' must be a comma-separated string, got {value!r}")
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"run-config '{key}' must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"run-config '{key}' must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"run-config '{key}' must be a number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"run-config '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"run-config '{key}' has unsupported type {kind}")  # pragma: no cover


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"run-config '{key}' = {value!r} {rule}")
