"""Client-level differential privacy: held-out loss after a fixed number of rounds at ε ∈ {1, 4, 8} and without DP.

DP-FedAvg (McMahan et al., 2018, arXiv 1710.06963) over a population of virtual devices, for
``fedavg`` (A and B trained, clipped and noised) and ``ffa`` (FFA-LoRA, arXiv 2403.12313: A
frozen, only B). Each round r = 1..T:

1. Poisson sampling: each of the N devices takes part with probability q (``m = qN`` expected);
2. every sampled device trains the current global adapter on its shard
   (``client.train.train_adapter``) and its delta is clipped to L2 norm C
   (``server.privacy.mechanism.clip``);
3. the new global is ``global + (sum of clipped deltas + N(0, (zC)^2 I)) / m``
   (``server.privacy.mechanism.dp_mean``), z solved for the target ε at δ over T rounds of
   sampling rate q (``server.privacy.accountant.solve_noise_multiplier``).

The no-DP baseline runs the same code with z = 0, no clipping and the uniform mean of the
sampled deltas. Everything runs in this one process on the real 4-bit SmolLM2-135M base (no
Flower processes: hundreds of ClientApps on 2 cores would measure Ray, not privacy). Devices
are the 4 demo topics' training files cut into shards of a few consecutive examples (non-IID by
topic); the held-out set is the first examples of each topic's ``heldout.jsonl``.

Shrink it for a smoke run (prints only, never writes BENCHMARKS.md)::

    python -m simulations.bench.privacy --population 40 --sample-rate 0.1 --rounds 1 --heldout 4 --epsilons 0,8
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data import Encoded
from simulations.bench import Table, register

DATA = Path(__file__).resolve().parents[1] / "data" / "wordnet"
TOPICS = ("noun.animal", "noun.food", "noun.artifact", "verb.motion")
COMMAND = "python -m simulations.bench --only privacy"
WHAT = {"fedavg": "A and B", "ffa": "B only"}  # what each method trains, uploads and noises
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """What one run of the benchmark measures; the defaults fit ~15-20 min on 2 cores (see the notes)."""

    population: int = 400
    """N virtual devices, N / 4 per topic; device d holds ``shard`` consecutive training examples."""
    sample_rate: float = 0.04
    """q: each device's probability of taking part in a round (Poisson); m = qN = 16 expected."""
    rounds: int = 3
    """T, federated rounds: the accountant composes T sampled Gaussian releases. At ~2 s per
    device-round on 2 cores, N q T = 48 device-rounds per run keep the 8 runs near 16 min."""
    shard: int = 5
    """Training examples per device (all of them are one local batch)."""
    local_steps: int = 1
    """AdamW steps per device-round (fresh optimizer each round, as on a real device)."""
    lr: float = 1e-3
    max_seq_len: int = 128
    """No example of the 4 topics is longer (the longest is ~75 tokens with the system prompt)."""
    heldout: int = 24
    """Held-out examples per topic (the first ones of each heldout.jsonl)."""
    clip_norm: float = 1.0
    """C, the product's default ``dp.clip-norm``."""
    delta: float = 1e-5
    epsilons: tuple[float, ...] = (0.0, 1.0, 4.0, 8.0)
    """Target ε per run at ``delta``; 0 is the no-DP baseline."""
    methods: tuple[str, ...] = ("fedavg", "ffa")
    seed: int = 0
    """Seeds the initial adapter, the device sample of each round (the same in every run: the
    rows are paired), each device's data order and the noise."""

    def __post_init__(self) -> None:
        checks = [
            (self.population % len(TOPICS) == 0 and self.shard >= 1, "population: a multiple of the 4 topics"),
            (round(self.sample_rate * self.population) >= 1, "sample-rate x population must round to >= 1"),
            (0 < self.sample_rate <= 1, "sample-rate must be in (0, 1]"),
            (self.rounds >= 1 and self.local_steps >= 1 and self.heldout >= 1, "counts must be >= 1"),
            (self.clip_norm > 0 and 0 < self.delta < 1, "clip-norm must be > 0, delta in (0, 1)"),
            (all(e >= 0 for e in self.epsilons), "epsilons must be >= 0 (0: no DP)"),
            (set(self.methods) <= {"fedavg", "ffa"}, "DP applies to fedavg and ffa only"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"privacy bench settings: {message}")

    @property
    def expected_clients(self) -> int:
        """Return m = qN, with q rounded to k/N as the coordinator rounds ``fraction-train``."""
        return round(self.sample_rate * self.population)

    @property
    def q(self) -> float:
        """The sampling rate the accountant sees: m / N."""
        return self.expected_clients / self.population


@dataclass
class Fleet:
    """The base with its LoRA adapter (one model, reloaded for every device), the shards, the held-out set."""

    model: Any
    pad_id: int
    shards: list[list[Encoded]]
    heldout: list[Encoded]
    initial: State
    """The initial global adapter (A from the seed, B = 0: the base model's outputs)."""


@dataclass
class Result:
    """One (method, ε) run."""

    method: str
    epsilon: float
    z: float
    dim: int
    """Coordinates that are noised: A and B under fedavg, B only under ffa."""
    loss_before: float
    loss_after: float
    norms: list[float] = field(default_factory=list)
    """Pre-clip L2 norm of every device's delta."""
    clipped: int = 0
    sampled: list[int] = field(default_factory=list)
    """Devices sampled in each round."""
    seconds: float = 0.0
    a_std: float = 0.0
    """Standard deviation of the initial A entries (fedavg noises A too)."""
    spent: float = 0.0
    """Epsilon after the T rounds by the run's accountant at this z (the target, up to the solver's tolerance)."""


def load_fleet(settings: Settings) -> Fleet:
    """Load the 4-bit base (quantized once into the bench cache), attach LoRA, cut the data into shards."""
    from shared.adapter import adapter_state, attach_lora
    from shared.config import LoraConfig
    from shared.data import encode, load_jsonl
    from shared.model import compute_dtype, load_model, load_tokenizer
    from simulations.bench.int4 import _int4_dir

    spec = str(_int4_dir())
    tok = load_tokenizer(spec)
    model = attach_lora(load_model(spec, compute_dtype("auto")), LoraConfig(), settings.seed)
    per_topic, n = settings.population // len(TOPICS), settings.shard
    shards, heldout = [], []
    for topic in TOPICS:
        train = [encode(e, tok, settings.max_seq_len) for e in load_jsonl(DATA / topic / "train.jsonl")]
        if len(train) < per_topic * n:
            raise ValueError(f"{topic}: {len(train)} examples cannot fill {per_topic} shards of {n}")
        shards += [train[i * n : (i + 1) * n] for i in range(per_topic)]  # consecutive: one word's questions
        held = load_jsonl(DATA / topic / "heldout.jsonl")[: settings.heldout]
        heldout += [encode(e, tok, settings.max_seq_len) for e in held]
    return Fleet(model, tok.pad_token_id, shards, heldout, adapter_state(model))


def run(fleet: Fleet, settings: Settings, method: str, epsilon: float, loss_before: float) -> Result:
    """Run T rounds of (DP-)FedAvg for ``method`` at target ``epsilon`` (0: no DP); score the final global."""
    from client.train import evaluate
    from server.privacy.accountant import PrivacyBudget, Sampling, solve_noise_multiplier
    from server.privacy.mechanism import clip, update_norm
    from shared.adapter import load_adapter_state, uploaded_keys
    from shared.config import EvalConfig

    t0 = time.perf_counter()
    dp = epsilon > 0
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting warns per RDP order it skips: noise here
    z = solve_noise_multiplier(epsilon, settings.delta, settings.q, settings.rounds) if dp else 0.0
    noised = sorted(uploaded_keys(method, fleet.initial))
    result = Result(method, epsilon, z, sum(fleet.initial[k].numel() for k in noised), loss_before, math.nan)
    result.a_std = float(torch.cat([v.flatten() for k, v in fleet.initial.items() if ".lora_A." in k]).std())
    if dp:
        budget = PrivacyBudget(z, settings.delta, Sampling(settings.population, settings.expected_clients), None)
        result.spent = budget.projected(settings.rounds)
    sampler = np.random.default_rng(settings.seed)  # the same devices each round in every run
    noise = torch.Generator().manual_seed(settings.seed + 1)
    global_ = dict(fleet.initial)
    for server_round in range(1, settings.rounds + 1):
        sampled = np.flatnonzero(sampler.random(settings.population) < settings.q)
        result.sampled.append(len(sampled))
        deltas = []
        for device in sampled:
            delta = local_delta(fleet, settings, global_, method, int(device), server_round)
            if dp:
                delta, norm = clip(delta, settings.clip_norm)
                result.clipped += int(norm > settings.clip_norm)
            else:
                norm = update_norm(delta)
            result.norms.append(float(norm))
            deltas.append(delta)
        global_ = aggregate(global_, noised, deltas, settings, z, noise)
        elapsed = time.perf_counter() - t0
        print(f"privacy {method} eps={epsilon:g}: round {server_round}, {len(sampled)} devices, {elapsed:.0f} s")
    load_adapter_state(fleet.model, global_)
    eval_cfg = EvalConfig(max_examples=len(fleet.heldout), batch_size=32)
    result.loss_after = evaluate(fleet.model, fleet.heldout, eval_cfg, fleet.pad_id).loss
    result.seconds = time.perf_counter() - t0
    return result


def local_delta(fleet: Fleet, settings: Settings, global_: State, method: str, device: int, server_round: int) -> State:
    """One device's round: train the global on its shard, return what it uploads (trained - global)."""
    from client.train import round_seed, train_adapter
    from shared.adapter import adapter_state, load_adapter_state, set_trainable_factors, uploaded_keys
    from shared.config import TrainConfig

    load_adapter_state(fleet.model, global_)
    set_trainable_factors(fleet.model, method)
    shard = fleet.shards[device]
    cfg = TrainConfig(
        steps=settings.local_steps, batch_size=len(shard), lr=settings.lr, max_seq_len=settings.max_seq_len
    )
    train_adapter(fleet.model, shard, cfg, fleet.pad_id, round_seed(settings.seed, server_round, str(device)))
    trained = adapter_state(fleet.model)
    return {k: trained[k] - global_[k] for k in uploaded_keys(method, trained)}


def aggregate(
    global_: State, keys: list[str], deltas: list[State], settings: Settings, z: float, noise: torch.Generator
) -> State:
    """Return the round's new global: the DP mean over m = qN (z > 0), or the uniform mean of the deltas (z = 0).

    Under DP a round with no sampled device still releases (noise only): skipping it would
    reveal that nobody took part.
    """
    from server.privacy.mechanism import dp_mean

    if z == 0 and not deltas:
        return global_
    expected = settings.expected_clients if z > 0 else len(deltas)
    return dp_mean(global_, keys, deltas, expected, z, settings.clip_norm, noise)


def measure(settings: Settings) -> tuple[list[Result], float, float]:
    """Load once, score the initial global once, run every (method, ε); return results, load s and base loss."""
    from client.train import evaluate
    from shared.config import EvalConfig

    t0 = time.perf_counter()
    fleet = load_fleet(settings)
    loss_before = evaluate(
        fleet.model, fleet.heldout, EvalConfig(max_examples=len(fleet.heldout), batch_size=32), fleet.pad_id
    ).loss
    setup = time.perf_counter() - t0
    results = [run(fleet, settings, m, eps, loss_before) for m in settings.methods for eps in settings.epsilons]
    return results, setup, loss_before


@register("privacy")
def privacy() -> Table:
    """Run the benchmark at its default settings (the figures of BENCHMARKS.md)."""
    return bench(Settings())


def bench(settings: Settings) -> Table:
    """Run every (method, ε) of ``settings``; tabulate."""
    import os

    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    results, setup, _ = measure(settings)
    return table(results, settings, setup, time.perf_counter() - t0, (load_before, os.getloadavg()[0]))


HEADER = ["method", "target ε", "ε spent", "z", "m = qN", "noise std / coord", "noise L2 / C", "clipped"]
HEADER += ["median ‖Δ‖", "held-out before", "held-out after", "gain kept", "run s"]


def table(results: list[Result], s: Settings, setup: float, wall: float, load: tuple[float, float]) -> Table:
    """Tabulate the runs; the notes say what was chosen and what the figures mean."""
    out = Table(
        f"Client-level DP (DP-FedAvg): held-out loss after {s.rounds} rounds, {s.population} virtual "
        f"devices, q = {s.q:g}",
        COMMAND,
        list(HEADER),
    )
    baseline = {r.method: r.loss_after for r in results if r.epsilon == 0}
    out.rows = [_row(r, s, baseline.get(r.method, math.nan)) for r in results]
    out.notes = _notes(results, s, setup, wall, load)
    return out


def _row(r: Result, s: Settings, baseline: float) -> list[str]:
    """One run's row; ``baseline`` is the same method's held-out loss after the rounds without DP."""
    from server.privacy.mechanism import noise_std

    if r.epsilon == 0:
        dp_cells = ["no DP", "-", "0", f"{s.expected_clients}", "0", "0", "-"]
    else:
        std = noise_std(r.z, s.clip_norm, s.expected_clients)
        dp_cells = [
            f"{r.epsilon:g}",
            f"{r.spent:.3f}",
            f"{r.z:.3f}",
            f"{s.expected_clients}",
            f"{std:.2e}",
            f"{std * math.sqrt(r.dim) / s.clip_norm:.1f}",  # E||N(0, std^2 I_dim)|| ~ std sqrt(dim)
            f"{r.clipped / max(len(r.norms), 1):.0%}",
        ]
    gain = r.loss_before - baseline
    kept = (r.loss_before - r.loss_after) / gain if gain > 0 else math.nan
    return [
        r.method,
        *dp_cells,
        f"{statistics.median(r.norms):.3f}" if r.norms else "-",
        f"{r.loss_before:.4f}",
        f"{r.loss_after:.4f}",
        f"{kept:.2f}",
        f"{r.seconds:.0f}",
    ]


def _notes(results: list[Result], s: Settings, setup: float, wall: float, load: tuple[float, float]) -> list[str]:
    m, dims = s.expected_clients, {r.method: r.dim for r in results}
    sampled = results[0].sampled if results else []
    notes = [
        f"settings (the defaults fit ~16 min on 2 cores): N = {s.population} virtual devices "
        f"({s.population // len(TOPICS)} per topic of {', '.join(TOPICS)}), each {s.shard} consecutive examples "
        "of its topic's train.jsonl (non-IID); "
        f"Poisson sampling q = {s.q:g} (m = qN = {m} expected; sampled per round: {sampled}, the same devices in "
        f"every row); T = {s.rounds} rounds; per device-round {s.local_steps} AdamW step(s) over its whole shard "
        f"(batch {s.shard}, lr {s.lr:g}, sequences <= {s.max_seq_len} tokens, fresh optimizer)",
        "model: SmolLM2-135M-Instruct, our 4-bit base (server/quantize.py), LoRA r=8 alpha=16 on all 7 linear "
        f"kinds; noised coordinates: {', '.join(f'{k} {WHAT[k]} ({n:,})' for k, n in dims.items())}; one process, "
        "one device trains at a time (no Flower)",
        f"held-out: the first {s.heldout} examples of each topic's heldout.jsonl ({s.heldout * len(TOPICS)}), mean "
        "cross-entropy per response token; before = the initial adapter (B = 0: the base model); gain kept = "
        "(before - after) / (before - after without DP) of the same method",
        f"DP: C = {s.clip_norm:g}; z solved for the target ε at δ = {s.delta:g} over T rounds at rate q (RDP "
        "accountant, Poisson); the global moves by (sum of clipped deltas + N(0, (zC)^2)) / m once per round "
        "(noise from the bench's seed, for paired rows; the coordinator seeds it from the OS); "
        "without DP: no clipping, the uniform mean of the sampled deltas, z = 0; clipped: share of deltas with "
        "norm > C; median ‖Δ‖: before clipping",
    ]
    notes += _verdict(results, s)
    notes.append(
        f"wall: {wall:.0f} s in all (load, 4-bit base from the bench cache, first evaluation: {setup:.0f} s); "
        f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after (2 cores)"
    )
    return notes


def _verdict(results: list[Result], s: Settings) -> list[str]:
    """Say what the figures say, computed from them: where DP costs too much at this fleet size."""
    m, out = s.expected_clients, []
    for r in (r for r in results if r.epsilon > 0):
        need = math.ceil(r.z * math.sqrt(r.dim))  # clients per round for which the noise's L2 is C at this z
        baseline = next((b.loss_after for b in results if b.method == r.method and b.epsilon == 0), math.nan)
        if r.loss_after > r.loss_before:
            what = "worse than no adapter at all"
        elif r.loss_after > baseline:
            what = f"{(r.loss_after - baseline) / max(r.loss_before - baseline, 1e-9):.0%} of the no-DP gain lost"
        else:
            what = "no loss of utility"
        if r.method == "fedavg":
            std = r.z * s.clip_norm / m
            what += f" (fedavg noises A too: noise std {std:.3g} per entry vs {r.a_std:.3g} for A's initial entries)"
        out.append(
            f"{r.method} at ε = {r.epsilon:g}: {what}; the noise's L2 norm is "
            f"{r.z * math.sqrt(r.dim) / m:.0f}x C, the bound on the mean of the clipped updates; it shrinks to "
            f"C only with m >= z·sqrt(dim) = {need:,} clients per round (N = {math.ceil(need / s.q):,} "
            f"devices at this q) at the same z"
        )
    return out


def _parse(argv: list[str] | None) -> Settings:
    """Parse ``--population 40 --epsilons 0,8 ...`` (any field of :class:`Settings`) for a shrunken smoke run."""
    parser = argparse.ArgumentParser(description="The privacy benchmark, printed only (BENCHMARKS.md untouched).")
    defaults = Settings()
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        kind = float if isinstance(value, float) else int if isinstance(value, int) else str
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, help=f"default {value}")
    args = vars(parser.parse_args(argv))
    changed: dict[str, Any] = {}
    for name, value in args.items():
        if value is None:
            continue
        if name == "epsilons":
            value = tuple(float(x) for x in value.split(","))
        elif name == "methods":
            value = tuple(x.strip() for x in value.split(","))
        changed[name] = value
    return replace(defaults, **changed)


if __name__ == "__main__":
    print(bench(_parse(None)).markdown())
