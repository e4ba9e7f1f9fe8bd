"""Do the new aggregators agree with today's on real updates? The demo's 4 devices, one round, every method.

Real SmolLM2-135M on the 4-bit base, the demo's 4 WordNet topics as 4 devices, trained in this
process with the demo's settings: round 1 from the shared initial adapter (B = 0), averaged with
fedavg into a global whose dW is not 0, then round 2 from that global: its 4 deltas (rounded to fp16,
as the wire carries them; ffa: a second round 2 with A frozen, B only) are aggregated by

* today: :func:`server.aggregate.make_aggregator` fed ``apply_update(global, delta)``;
* new: :func:`server.modulewise.round_aggregator` (what the coordinator runs: fedavg/ffa streaming,
  exact/ties spooled and module-wise);
* new-2w: the same with ``aggregation.workers = 2`` (two local Ray workers, a shard of modules each).

Figures per method: the largest and the median relative difference ||dW_new - dW_today||_F / ||dW_today||_F
over the 210 modules; for exact, also how far each one's rank-r re-factorization is from the best rank-r
approximation of the exact mean (today: a full SVD, the optimum; new: randomized subspace iteration).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from client.train import train_adapter
from server.aggregate import apply_update, delta_w, make_aggregator, modules
from server.modulewise import round_aggregator
from shared.adapter import adapter_state, attach_lora, load_adapter_state, set_trainable_factors
from shared.config import FleetConfig
from shared.data import encode, load_jsonl
from shared.model import compute_dtype, load_model, load_tokenizer, resolve_model
from simulations.bench import Table, register
from simulations.demo import app_defaults

METHODS = ("fedavg", "ffa", "exact", "ties")
DATA = Path(__file__).resolve().parents[1] / "data" / "wordnet"


def _round(cfg: FleetConfig, enc: dict[str, list[Any]], pad: int, start: dict[str, torch.Tensor], method: str
           ) -> list[tuple[dict[str, torch.Tensor], float]]:  # fmt: skip
    """Each topic's device trains one round from ``start``; its fp16 delta and example count."""
    out = []
    for i, topic in enumerate(cfg.topics):
        model = attach_lora(load_model(cfg.model, compute_dtype(cfg.train.dtype)), cfg.lora, cfg.seed)
        load_adapter_state(model, start)
        set_trainable_factors(model, method)
        train_adapter(model, enc[topic], cfg.train, pad, cfg.seed + i)
        local = adapter_state(model)
        keys = [k for k in local if method != "ffa" or ".lora_B." in k]
        out.append(({k: (local[k] - start[k]).half().float() for k in keys}, float(len(enc[topic]))))
    return out


def _aggregate(impl: str, method: str, glob: dict[str, torch.Tensor], deltas: list[Any], cfg: FleetConfig) -> Any:
    rank, alpha = cfg.lora.rank, cfg.lora.alpha
    if impl == "today":
        agg: Any = make_aggregator(method, glob, rank, alpha)
        for d, n in deltas:
            agg.add(apply_update(glob, d), n)
        return agg.result()
    agg = round_aggregator(method, glob, rank, alpha, dtype=torch.float16, workers=2 if impl == "new-2w" else 1)
    for d, n in deltas:
        agg.add(d, n)
    return agg.result()


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], scale: float) -> list[float]:
    return [((delta_w(a, m, scale) - delta_w(b, m, scale)).norm() / delta_w(b, m, scale).norm()).item()
            for m in modules(b)]  # fmt: skip


def _refactor_excess(out: dict[str, torch.Tensor], glob: dict[str, torch.Tensor], deltas: list[Any],
                     scale: float, rank: int) -> float:  # fmt: skip
    """Largest ||M - ours|| / ||M - best rank-r|| - 1 over the modules, M = the exact mean dW."""
    worst = 0.0
    total = sum(n for _, n in deltas)
    for m in modules(glob):
        mean = sum(n * delta_w(apply_update(glob, d), m, scale) for d, n in deltas) / total
        s = torch.linalg.svdvals(mean)
        best = s[rank:].norm().item()
        ours = (mean - delta_w(out, m, scale)).norm().item()
        worst = max(worst, ours / best - 1 if best > 0 else 0.0)
    return worst


@register("agreement")
def agreement() -> Table:
    """Train the demo's round 2 for real, then aggregate it with today's and the new code, every method."""
    import ray

    flat = {**app_defaults(), "model": str(resolve_model("smollm2-135m-instruct"))}
    cfg = FleetConfig.from_run_config(flat)
    tok = load_tokenizer(cfg.model)
    enc = {t: [encode(e, tok, cfg.train.max_seq_len) for e in load_jsonl(DATA / t / "train.jsonl")] for t in cfg.topics}
    init = adapter_state(attach_lora(load_model(cfg.model, compute_dtype(cfg.train.dtype)), cfg.lora, cfg.seed))
    scale = cfg.lora.alpha / cfg.lora.rank
    round1 = _round(cfg, enc, tok.pad_token_id, init, "fedavg")
    glob = _aggregate("today", "fedavg", init, round1, cfg)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    table = Table(
        title="New aggregators vs today's on real updates (SmolLM2-135M, the demo's 4 devices, round 2)",
        command="python -m simulations.bench --only agreement",
        header=["method", "impl", "max rel. diff of dW", "median rel. diff", "rank-r excess error (exact)"],
    )
    try:
        round2 = {"ab": _round(cfg, enc, tok.pad_token_id, glob, "fedavg"),
                  "b": _round(cfg, enc, tok.pad_token_id, glob, "ffa")}  # fmt: skip
        for method in METHODS:
            deltas = round2["b" if method == "ffa" else "ab"]
            today = _aggregate("today", method, glob, deltas, cfg)
            impls = ("new", "new-2w") if method in ("exact", "ties") else ("new",)
            if method == "exact":
                excess = _refactor_excess(today, glob, deltas, scale, cfg.lora.rank)
                table.rows.append([method, "today", "-", "-", f"{excess:.2e}"])
            for impl in impls:
                new = _aggregate(impl, method, glob, deltas, cfg)
                diff = _differences(new, today, scale)
                extra = f"{_refactor_excess(new, glob, deltas, scale, cfg.lora.rank):.2e}" if method == "exact" else ""
                identical = all(torch.equal(new[k], today[k]) for k in today)
                table.rows.append([method, impl, f"{max(diff):.2e}" + (" (identical)" if identical else ""),
                                   f"{statistics.median(diff):.2e}", extra])  # fmt: skip
    finally:
        ray.shutdown()
    table.notes = [
        "rel. diff: ||dW_new - dW_today||_F / ||dW_today||_F of each of the 210 modules (7 linear kinds x 30 layers)",
        "rank-r excess: max over modules of ||M - B A s|| / ||M - M_r|| - 1, M the exact weighted mean dW of the "
        "4 updates, M_r its best rank-8 approximation (full SVD); 0 is optimal. The new exact re-factors by "
        "randomized subspace iteration (18 columns, 4 power iterations): exact when rank(M) <= 18; "
        "here rank(M) <= 4 x 8 = 32",
        "ties: both trim at the magnitude quantile of the same 65,536 sampled entries, the new one computing "
        "them from the factors: rounding (an entry at the cut may flip) and the randomized re-factorization differ",
    ]
    return table
