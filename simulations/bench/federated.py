"""Federated runs side by side: the main job's cost, and held-out quality per aggregation method.

One run per method of the default demo (real SmolLM2, 4 WordNet topics as 4 clients, 3 rounds),
plus two baselines trained in-process with the same total number of steps:

* centralized: one LoRA on the pooled training data of all clients (4 x 3 x steps steps);
* local-only: each client alone on its own data (3 x steps steps), scored on every topic.

Every figure is a held-out loss (response tokens) on the same 64 examples per topic.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from client.train import evaluate, train_adapter
from server.report import clients_by_name
from shared.adapter import attach_lora
from shared.config import FleetConfig
from shared.data import encode, load_jsonl
from shared.model import compute_dtype, load_model, load_tokenizer
from simulations.bench import Table, register
from simulations.demo import app_defaults, run_demo
from simulations.flower_local import ROOT

METHODS = ("fedavg", "exact", "ffa", "ties")


@register("federated")
def federated(overrides: dict[str, Any] | None = None) -> list[Table]:
    """Run every method, then the baselines; return the demo table and the quality table.

    ``overrides`` (run-config keys) make a quick smoke run possible, e.g. with a tiny model.
    """
    overrides = overrides or {}
    runs: dict[str, tuple[dict[str, Any], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            t0 = time.time()
            data = run_demo(
                {**overrides, "aggregation.method": method, "run-name": method},
                output_dir=Path(tmp) / "out",
                flwr_home=Path(tmp) / "flwr",
            )
            runs[method] = (data, time.time() - t0)
    cfg = FleetConfig.from_run_config({**app_defaults(), **overrides, "data-dir": str(_data_dir())})
    central, local = _baselines(cfg)
    demo_run = _demo_table(*runs[cfg.aggregation.method], "python -m simulations.bench --only federated")
    return [demo_run, _quality_table(runs, central, local, cfg)]


# the held-out mean after the demo's 3 rounds at float32 compute, before issue 20's aggregators (streaming,
# server/aggregate.py): federated@amd-avx2, commit 989e553 (ties at 121a660 on intel-avx512: 2.1749)
BEFORE = {"fedavg": 2.1966, "exact": 2.1872, "ffa": 2.2680, "ties": 2.1757}


@register("methods")
def methods() -> Table:
    """Run the demo once per aggregation method at float32 compute; tabulate it beside its held-out loss before.

    The check that the module-wise aggregators (``server/modulewise.py``) leave the main job's quality
    where the streaming ones had it: float32 because every earlier table trained in float32 (a CPU
    with native bf16 would otherwise train in bf16 and move every figure). No baselines (see ``federated``).
    """
    topics = str(app_defaults()["topics"]).split(",")
    table = Table(
        title="The demo per aggregation method (float32 compute): held-out loss after 3 rounds, new vs before",
        command="python -m simulations.bench --only methods",
        header=["method", *topics, "mean", "before (streaming)", "difference", "run s"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            t0 = time.time()
            data = run_demo(
                {"train.dtype": "float32", "aggregation.method": method, "run-name": method},
                output_dir=Path(tmp) / "out",
                flwr_home=Path(tmp) / "flwr",
            )
            last, wall = _final(data), time.time() - t0
            per = clients_by_name(last)
            mean = last["mean_heldout_loss"]
            table.rows.append(
                [
                    method,
                    *(f"{per[t]['heldout_loss']:.4f}" for t in topics),
                    f"{mean:.4f}",
                    f"{BEFORE[method]:.4f}",
                    f"{mean - BEFORE[method]:+.4f}",
                    f"{wall:.0f}",
                ]  # fmt: skip
            )
            print(table.rows[-1], flush=True)
    table.notes.append(
        "before: the same demo (defaults, float32) with the streaming aggregators of server/aggregate.py, "
        "federated@amd-avx2 at commit 989e553 (ties at 121a660 on intel-avx512: 2.1749)"
    )
    return table


@register("demo")
def demo() -> Table:
    """Run the main job as ``make demo`` runs it (defaults, into ``outputs/``); return its table.

    Its signed base and final adapter are what ``--only inference`` then serves.
    """
    t0 = time.time()
    data = run_demo({}, output_dir=ROOT / "outputs", flwr_home=ROOT / ".flwr")
    return _demo_table(data, time.time() - t0, "python -m simulations.bench --only demo")


def _data_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "wordnet"


def _baselines(cfg: FleetConfig) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    tok = load_tokenizer(cfg.model)
    enc = {
        t: {
            split: [encode(e, tok, cfg.train.max_seq_len) for e in load_jsonl(_data_dir() / t / f"{split}.jsonl")]
            for split in ("train", "heldout")
        }
        for t in cfg.topics
    }

    def fresh() -> Any:
        return attach_lora(load_model(cfg.model, compute_dtype(cfg.train.dtype)), cfg.lora, cfg.seed)

    def score(model: Any) -> dict[str, float]:
        return {t: evaluate(model, enc[t]["heldout"], cfg.eval, tok.pad_token_id).loss for t in cfg.topics}

    rounds, steps = cfg.num_server_rounds, cfg.train.steps
    pooled = [ex for t in cfg.topics for ex in enc[t]["train"]]
    model = fresh()
    train_adapter(model, pooled, _steps(cfg, rounds * steps * len(cfg.topics)), tok.pad_token_id, cfg.seed)
    central = score(model)
    local = {}
    for t in cfg.topics:
        model = fresh()
        train_adapter(model, enc[t]["train"], _steps(cfg, rounds * steps), tok.pad_token_id, cfg.seed)
        local[t] = score(model)
    return central, local


def _steps(cfg: FleetConfig, n: int) -> Any:
    from dataclasses import replace

    return replace(cfg.train, steps=n)


def _final(data: dict[str, Any]) -> dict[str, Any]:
    return max(data["rounds"], key=lambda r: r["round"])


def _demo_table(data: dict[str, Any], wall: float, command: str) -> Table:
    table = Table(
        title=f"Main job (make demo, {data['run']['method']}): wall time and bytes per client-round",
        command=command,
        header=[
            "round",
            "clients",
            "mean train loss",
            "mean held-out loss",
            "up / client (MB)",
            "down / client (MB)",
            "round s",
        ],
    )
    for r in sorted(data["rounds"], key=lambda r: r["round"]):
        trained = [c for c in r["clients"].values() if "bytes_up" in c]
        up = f"{sum(c['bytes_up'] for c in trained) / len(trained) / 1e6:.3f}" if trained else "-"
        down = f"{sum(c['bytes_down'] for c in trained) / len(trained) / 1e6:.3f}" if trained else "-"
        train = f"{r['mean_train_loss']:.4f}" if "mean_train_loss" in r else "-"
        name = "before" if r["round"] == 0 else str(r["round"])
        table.rows.append(
            [name, str(len(r["clients"])), train, f"{r['mean_heldout_loss']:.4f}", up, down, f"{r['seconds']:.0f}"]
        )
    cfg = data["run"]["config"]
    table.notes.append(
        f"wall time of the run (SuperLink start to stop; setup, install and model fetch excluded): {wall:.0f} s"
    )
    table.notes.append(
        f"{cfg.get('train.steps')} steps x batch {cfg.get('train.batch-size')} per client-round, "
        f"LoRA r={cfg.get('lora.rank')}, fp16 deltas up, fp16 global adapter down"
    )
    return table


def _quality_table(
    runs: dict[str, tuple[dict[str, Any], float]],
    central: dict[str, float],
    local: dict[str, dict[str, float]],
    cfg: FleetConfig,
) -> Table:
    topics = list(cfg.topics)
    c_mean = sum(central.values()) / len(central)
    table = Table(
        title=f"Aggregation quality: held-out loss after the same training ({len(topics)} non-IID clients, "
        f"{cfg.num_server_rounds} rounds)",
        command="python -m simulations.bench --only federated",
        header=["adapter", *topics, "mean", "x centralized", "up / client-round (MB)", "run s"],
    )
    before = min(next(iter(runs.values()))[0]["rounds"], key=lambda r: r["round"])
    table.rows.append(
        [
            "base model (no adapter)",
            *(f"{clients_by_name(before)[t]['heldout_loss']:.4f}" for t in topics),
            f"{before['mean_heldout_loss']:.4f}",
            f"{before['mean_heldout_loss'] / c_mean:.3f}",
            "-",
            "-",
        ]
    )
    for method, (data, wall) in runs.items():
        last = _final(data)
        ups = [c["bytes_up"] for c in last["clients"].values() if "bytes_up" in c]
        table.rows.append(
            [
                f"federated {method}",
                *(f"{clients_by_name(last)[t]['heldout_loss']:.4f}" for t in topics),
                f"{last['mean_heldout_loss']:.4f}",
                f"{last['mean_heldout_loss'] / c_mean:.3f}",
                f"{sum(ups) / len(ups) / 1e6:.3f}",
                f"{wall:.0f}",
            ]
        )
    table.rows.append(
        ["centralized (pooled data)", *(f"{central[t]:.4f}" for t in topics), f"{c_mean:.4f}", "1.000", "-", "-"]
    )
    for owner, scores in local.items():
        mean = sum(scores.values()) / len(scores)
        table.rows.append(
            [
                f"local-only {owner}",
                *(f"{scores[t]:.4f}" for t in topics),
                f"{mean:.4f}",
                f"{mean / c_mean:.3f}",
                "-",
                "-",
            ]
        )
    steps = cfg.num_server_rounds * cfg.train.steps
    table.notes.append(
        f"each client trains {cfg.train.steps} steps x batch {cfg.train.batch_size} per round; "
        f"centralized: {steps * len(topics)} steps on pooled data; local-only: {steps} steps on its own data"
    )
    table.notes.append(
        f"held-out: first {cfg.eval.max_examples} examples of each topic's heldout.jsonl, "
        "mean cross-entropy per response token"
    )
    return table
