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

from shared.config_aggregation import DELTA_ENCODINGS, DP_METHODS, AggregationConfig, DpConfig
from shared.config_checks import ConfigError
from shared.config_checks import check as _check
from shared.config_checks import number_in as _number_in
from shared.layout import FOLDER_NAME

__all__ = [
    "BASE_FORMATS",
    "DELTA_ENCODINGS",
    "DP_METHODS",
    "DTYPES",
    "MAX_SLOWDOWN",
    "AggregationConfig",
    "BaseConfig",
    "ConfigError",
    "DpConfig",
    "EvalConfig",
    "FleetConfig",
    "LoraConfig",
    "SigningConfig",
    "StateConfig",
    "TrainConfig",
]


MAX_LORA_RANK = 4096  # no layer of a model this serves is wider; the edge refuses a larger r (client/onnx_adapter.py)
MAX_LORA_SCALE = 1e3  # alpha / rank (PEFT's defaults: 1-2); the edge refuses a larger scale


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
        _check(1 <= self.rank <= MAX_LORA_RANK, "lora.rank", self.rank, f"must be in [1, {MAX_LORA_RANK}]")
        ok = all(len(r) <= 6 and r.isascii() and r.isdigit() and 1 <= int(r) <= self.rank for r in self.device_ranks)
        why = f"must be integers in [1, lora.rank = {self.rank}]"
        _check(ok, "lora.device-ranks", ",".join(self.device_ranks)[:80], why)
        why = f"must be > 0 and at most {MAX_LORA_SCALE:g} x lora.rank (an edge device refuses a larger scale)"
        _check(0 < self.alpha <= MAX_LORA_SCALE * self.rank, "lora.alpha", self.alpha, why)
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target-modules", self.target_modules, "must name a layer")


DTYPES = ("auto", "float32", "bfloat16")
MAX_SLOWDOWN = 100
MAX_TRAIN_STEPS = 100_000  # local steps a round may ask of a device (the demo's are 30); more is not a round
MAX_SERVER_ROUNDS = 100_000  # 10^15 was accepted: a DP run's start then projected epsilon round count by count
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0  # a week: a phase that waits longer for a silent device is stopped by it
MAX_APP_SIGNATURE_CHARS = 4096  # = client/app_pin.py MAX_SIGNATURE_CHARS: a signature record is ~130


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
        _check(1 <= self.steps <= MAX_TRAIN_STEPS, "train.steps", self.steps, f"must be in [1, {MAX_TRAIN_STEPS}]")
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
    onnx: int = 0
    """Server: 1, also export the 4-bit base to ONNX Runtime and sign it as ``<store>/onnx``, the
    base of inference-only devices (``fleetlora[edge]``: ``fleetlora fetch onnx``); what
    ``fleetlora export`` + ``fleetlora publish-onnx`` do by hand. Once per base (cached); about
    half a minute for SmolLM2."""

    def __post_init__(self) -> None:
        _check(self.serve in (0, 1), "base.serve", self.serve, "must be 0 or 1")
        _check(self.onnx in (0, 1), "base.onnx", self.onnx, "must be 0 or 1")
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
    round_timeout: float = 3600.0  # at most MAX_ROUND_TIMEOUT
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
    app_signature: str = ""  # at most MAX_APP_SIGNATURE_CHARS
    """A signature over the app this run ships, for devices that run only signed apps (``fleetlora app
    sign``; read by each device's app pin, ``client/app_pin.py``; the coordinator ignores it)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    state: StateConfig = field(default_factory=StateConfig)
    dp: DpConfig = field(default_factory=DpConfig)

    def __post_init__(self) -> None:
        rounds, most = self.num_server_rounds, MAX_SERVER_ROUNDS
        _check(1 <= rounds <= most, "num-server-rounds", rounds, f"must be in [1, {most:,}]")
        _check(self.min_clients >= 1, "min-clients", self.min_clients, "must be >= 1")
        # finite: a device that never answers must be left out at some point (async: given up, the run's stall)
        why = f"must be in (0, {MAX_ROUND_TIMEOUT:g}] seconds"
        _check(0 < self.round_timeout <= MAX_ROUND_TIMEOUT, "round-timeout", self.round_timeout, why)
        _check(0 < self.fraction_train <= 1, "fraction-train", self.fraction_train, "must be in (0, 1]")
        _check(0 <= self.fraction_evaluate <= 1, "fraction-evaluate", self.fraction_evaluate, "must be in [0, 1]")
        _check(all(c.isalnum() or c in "._-" for c in self.run_id), "run-id", self.run_id, "must be [A-Za-z0-9._-]")
        why = f"must be at most {MAX_APP_SIGNATURE_CHARS} characters"
        _check(len(self.app_signature) <= MAX_APP_SIGNATURE_CHARS, "app-signature", len(self.app_signature), why)
        _check(len(self.topics) >= 1, "topics", self.topics, "must name at least one topic")
        plain = all(FOLDER_NAME.fullmatch(t) for t in self.topics)  # each names a folder of data-dir
        _check(plain, "topics", ",".join(self.topics)[:80], "must be plain folder names ([A-Za-z0-9._-], no '/')")
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

    def release_run_id(self, flower_run_id: int) -> str:
        """Return the run id this run's releases carry: ``run-id``, else ``<run-name>-<Flower run id>``.

        The coordinator signs its releases with it; a device refuses a release of any other run
        (``client/verify.py``): replay protection is per run id, so an old release of another run
        would otherwise pass as this run's first.
        """
        return self.run_id or f"{self.run_name}-{flower_run_id}"

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
