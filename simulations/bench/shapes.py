"""Aggregation at the shapes users ship: SmolLM2-135M/360M, Llama-3.2-1B, SmolLM2-1.7B; today's vs module-wise.

No weights are needed: the global adapter and a pool of ``POOL`` client deltas are random with the
model's LoRA shapes (all 7 linear kinds of every layer), deltas rounded to fp16 as the wire carries
them. Each cell (model, r, method, updates, implementation) runs in a fresh process so its peak RSS
is its own; it times the round as the server runs it: ``count`` calls of ``add`` (cycling through
the pool) and the one ``result``.

* ``today``: :func:`server.aggregate.make_aggregator`, fed ``apply_update(global, delta)`` (the
  server before issue 20);
* ``new``: :func:`server.modulewise.round_aggregator`: fedavg/ffa as today (the same
  streaming code), exact and ties spooled to disk and aggregated module by module.

Cells that would not fit are not run, and say why: today's exact/ties hold 2 / 5 dense (d_out, d_in)
fp32 buffers per module (computed); a spool needs ``count`` x (fp16 factors) of disk; and a cell
whose time, extrapolated from the same cell at a smaller count, exceeds ``MAX_SECONDS`` is skipped.

Run one cell: ``python -m simulations.bench.shapes llama-1b 16 ties 100 new`` prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import torch

from server.aggregate import apply_update, make_aggregator
from server.modulewise import round_aggregator
from simulations.bench import Table, peak_rss, register

# name -> (layers, hidden, kv dim = kv heads x head dim, MLP width), from each model's config.json
MODELS = {
    "smollm2-135m": (30, 576, 3 * 64, 1536),
    "smollm2-360m": (32, 960, 5 * 64, 2560),
    "llama-1b": (16, 2048, 8 * 64, 8192),
    "smollm2-1.7b": (24, 2048, 32 * 64, 8192),
}
POOL, MAX_SECONDS, WORKERS = 4, 180.0, 2
NEW_MAX_SECONDS = 900.0  # the module-wise cells may run longer: their 1,000-update peak RSS is a goal of issue 20


def module_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every LoRA target module of ``model``, PEFT's key prefixes."""
    layers, h, kv, mlp = MODELS[model]
    kinds = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (mlp, h),
        "mlp.up_proj": (mlp, h),
        "mlp.down_proj": (h, mlp),
    }
    return {f"base_model.model.model.layers.{i}.{k}": s for i in range(layers) for k, s in kinds.items()}


def dense_entries(model: str) -> int:
    """Entries of one dense dW buffer over every module (what today's exact/ties hold per buffer)."""
    return sum(o * i for o, i in module_shapes(model).values())


def factor_entries(model: str, rank: int) -> int:
    """LoRA parameters of one adapter: r (d_out + d_in) per module."""
    return sum(rank * (o + i) for o, i in module_shapes(model).values())


def adapter(model: str, rank: int, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Return a random adapter (or delta) with ``model``'s LoRA keys and shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, (d_out, d_in) in module_shapes(model).items():
        out[prefix + ".lora_A.weight"] = torch.randn(rank, d_in, generator=g) * std
        out[prefix + ".lora_B.weight"] = torch.randn(d_out, rank, generator=g) * std
    return out


def measure(model: str, rank: int, method: str, count: int, impl: str) -> dict[str, float]:
    """Time one round of ``count`` updates; report seconds, updates/s, peak RSS and held memory."""
    global_state = adapter(model, rank, 0)
    pool = [{k: (v * 0.1).half().float() for k, v in adapter(model, rank, i).items()} for i in range(1, POOL + 1)]
    if method == "ffa":  # FFA-LoRA devices send B only
        pool = [{k: v for k, v in p.items() if ".lora_B." in k} for p in pool]
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if impl == "today":
        agg: Any = make_aggregator(method, global_state, rank, 2.0 * rank)
        for i in range(count):
            agg.add(apply_update(global_state, pool[i % POOL]), 1.0 + i % 3)
    else:
        workers = WORKERS if impl == "new-2w" else 1
        if workers > 1:  # Ray's own start is not the round's time: a coordinator starts it once
            import ray

            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            before = psutil.Process().memory_info().rss
            t0 = time.perf_counter()
        agg = round_aggregator(method, global_state, rank, 2.0 * rank, dtype=torch.float16, workers=workers)
        for i in range(count):
            agg.add(pool[i % POOL], 1.0 + i % 3)
    t_add = time.perf_counter() - t0
    agg.result()
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    workers_peak = sum(getattr(agg, "worker_peak_rss", []))  # Ray workers: their peaks add to the coordinator's
    return {
        "seconds": seconds,
        "add_seconds": t_add,
        "peak_rss": peak + workers_peak,
        "held": peak - before + workers_peak,
    }


def would_need(model: str, rank: int, method: str, count: int, impl: str) -> str | None:
    """Why a cell cannot run on this machine (memory or disk it would need), or None if it fits."""
    dense_gb = 4 * dense_entries(model) / 1e9
    if impl == "today" and method in ("exact", "ties"):
        need = dense_gb * (2 if method == "exact" else 5)  # exact: sum + a product; ties: base + 4 sums
        if need > 0.6 * psutil.virtual_memory().total / 1e9:
            return f"not run: would need {need:.0f} GB of memory"
    if impl.startswith("new") and method in ("exact", "ties"):
        disk = 2 * factor_entries(model, rank) * count / 1e9
        if disk > min(25.0, (shutil.disk_usage(tempfile.gettempdir()).free - (4 << 30)) / 1e9):
            return f"not run: would need {disk:.0f} GB of spool disk"
    return None


# (model, r, counts): the cells a full run measures; methods x {today, new} for each
GRID = (
    ("smollm2-135m", 8, (10, 100, 1000), ("today", "new", "new-2w")),
    ("llama-1b", 16, (10, 100, 1000), ("today", "new")),
)  # the 360M and 1.7B shapes run as single cells (``__main__``): a full sweep takes hours on 2 shared cores
METHODS = ("fedavg", "ffa", "exact", "ties")


def run_cell(model: str, rank: int, method: str, count: int, impl: str, threads: int) -> dict[str, Any]:
    """Run one cell in a fresh process with ``threads`` intra-op threads; its JSON, or why it did not run."""
    why = would_need(model, rank, method, count, impl)
    if why:
        return {"skipped": why}
    args = [sys.executable, "-m", "simulations.bench.shapes", model, str(rank), method, str(count), impl]
    env = {**os.environ, "FLEETLORA_BENCH_THREADS": str(threads)}
    limit = 2 * (NEW_MAX_SECONDS if impl.startswith("new") else MAX_SECONDS)
    try:
        out = subprocess.run(args, check=True, capture_output=True, text=True, env=env, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"skipped": f"stopped after {limit:.0f} s"}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def sweep(
    grid: tuple[tuple[str, int, tuple[int, ...], tuple[str, ...]], ...] = GRID,
    threads: int = 1,
    methods: tuple[str, ...] = METHODS,
) -> list[list[Any]]:
    """Run every cell of ``grid``, today's and the new one side by side.

    A count is skipped when the same cell at the smaller count predicts more than ``MAX_SECONDS``.
    """
    rows: list[list[Any]] = []
    for model, rank, counts, impls in grid:
        for method in methods:
            for impl in [i for i in impls if method in ("exact", "ties") or i == "today"]:  # fedavg/ffa: one code
                last: dict[str, Any] | None = None
                for count in counts:
                    predicted = _predict(last, count, impl, method)
                    if predicted > (NEW_MAX_SECONDS if impl.startswith("new") else MAX_SECONDS):
                        r: dict[str, Any] = {"skipped": f"not run: ~{predicted:.0f} s predicted"}
                    else:
                        r = run_cell(model, rank, method, count, impl, threads)
                    if "seconds" in r:
                        last = {**r, "count": count}
                    elif r["skipped"].startswith("stopped"):  # a larger count would only stop later
                        last = {"seconds": 1e9, "add_seconds": 1e9, "count": count}
                    rows.append([model, rank, method, impl, count, r])
                    print(rows[-1], flush=True)
    return rows


def _predict(last: dict[str, Any] | None, count: int, impl: str, method: str) -> float:
    """Seconds a cell would take at ``count``, from the same cell at a smaller count.

    Today's adds scale with the count and its result() does not; the module-wise exact/ties do
    their per-update work in result(), so their whole time is scaled (an upper bound: the
    re-factorization does not grow).
    """
    if last is None:
        return 0.0
    if impl.startswith("new") and method in ("exact", "ties"):
        return float(last["seconds"] / last["count"] * count)
    return float(last["add_seconds"] / last["count"] * count + last["seconds"] - last["add_seconds"])


def table(rows: list[list[Any]], load: str, threads: int) -> Table:
    """Tabulate :func:`sweep`'s rows."""
    out = Table(
        title="Aggregation at model shapes: today's streaming aggregators vs module-wise (spooled) exact/ties",
        command="python -m simulations.bench --only shapes",
        header=["model", "r", "method", "impl", "updates", "seconds", "updates/s", "peak RSS MB", "held MB"],
    )
    for model, rank, method, impl, count, r in rows:
        if "seconds" not in r:
            out.rows.append([model, str(rank), method, impl, f"{count:,}", r["skipped"], "", "", ""])
            continue
        cells = [f"{r['seconds']:.1f}", f"{count / r['seconds']:.1f}", f"{r['peak_rss'] / 1e6:.0f}"]
        out.rows.append([model, str(rank), method, impl, f"{count:,}", *cells, f"{r['held'] / 1e6:.0f}"])
    out.notes = [
        "today: server/aggregate.py's streaming classes (dense state for every module at once); new: "
        "server/modulewise.py (exact/ties spooled as fp16 deltas, aggregated module by module; ties' trim "
        "and fold one compiled pass, server/ties_fold.py); new-2w: the same over aggregation.workers = 2 "
        "local Ray workers, a shard of the modules each (server/shards.py; Ray's start not timed, the workers' "
        "peak RSS added to the coordinator's; at 135M shapes only, for the sweep's time); fedavg/ffa are the same "
        "streaming code in all (today's column runs today's code: multi-tensor adds since issue 20)",
        "seconds: every add plus the one result() of a round; held MB: peak RSS minus RSS before the first add",
        f"not-run cells say why: memory they would need (computed), spool disk over 25 GB, or time over "
        f"{MAX_SECONDS:.0f} s (today) / {NEW_MAX_SECONDS:.0f} s (new) predicted from the same cell's smaller count",
        f"{threads} intra-op thread(s) per process, today's and new alike (FLEETLORA_BENCH_THREADS; on a loaded "
        "machine 2 OpenMP threads run 10-100x slower, spinning on a busy core: measure quiet, or set 1)",
        f"uptime load (1/5/15 min) before and after: {load}",
    ]
    return out


@register("shapes")
def shapes() -> Table:
    """Run :func:`sweep` over ``GRID`` and tabulate it."""
    threads = int(os.environ.get("FLEETLORA_BENCH_THREADS", psutil.cpu_count(logical=True) or 1))
    before = os.getloadavg()
    rows = sweep(threads=threads)
    after = os.getloadavg()
    load = f"{before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f} -> {after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f}"
    return table(rows, load, threads)


if __name__ == "__main__":
    model_, rank_, method_, count_, impl_ = sys.argv[1:6]
    torch.set_num_threads(int(os.environ.get("FLEETLORA_BENCH_THREADS", psutil.cpu_count(logical=True) or 1)))
    print(json.dumps(measure(model_, int(rank_), method_, int(count_), impl_)))
