"""Aggregation throughput and peak memory for 10, 100 and 1,000 SmolLM2-sized r=8 updates, per method.

Each (method, count) runs in a fresh process so its peak RSS is its own. The process builds the
global adapter and a pool of 8 distinct client adapters with SmolLM2-135M's shapes (30 layers x 7
linear modules, r=8: 2.44M parameters), then times ``count`` calls of ``add`` (cycling through
the pool) plus the one ``result`` that ends a round. Memory: peak RSS minus the RSS before the
first ``add`` is what the aggregator holds; it must not grow with the count.

Run alone: ``python -m simulations.bench.aggregation fedavg 100`` prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import psutil
import torch

from server.aggregate import make_aggregator
from simulations.bench import Table, peak_rss, register, run_child

METHODS = ("fedavg", "exact", "ffa", "ties")
COUNTS = (10, 100, 1000)
TIES_MAX = 100  # ~1.5 s per TIES update (dW trim of 106M values): 1,000 would take ~25 min
RANK, ALPHA, POOL = 8, 16, 8
# SmolLM2-135M: hidden 576, 3 KV heads x 64, MLP 1536, 30 layers; (d_out, d_in) per module
SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
LAYERS = 30


def adapter(seed: int) -> dict[str, torch.Tensor]:
    """Return a random adapter with SmolLM2's LoRA keys and shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(LAYERS):
        for name, (d_out, d_in) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            out[prefix + ".lora_A.weight"] = torch.randn(RANK, d_in, generator=g) * 0.02
            out[prefix + ".lora_B.weight"] = torch.randn(d_out, RANK, generator=g) * 0.02
    return out


def measure(method: str, count: int) -> dict[str, float]:
    """Time ``count`` adds and one result; report updates/s and memory."""
    torch.set_num_threads(psutil.cpu_count(logical=True) or 1)
    global_state = adapter(0)
    pool = [adapter(i) for i in range(1, POOL + 1)]
    if method == "ffa":  # FFA-LoRA clients keep the global A
        pool = [{k: global_state[k] if ".lora_A." in k else v for k, v in p.items()} for p in pool]
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    agg = make_aggregator(method, global_state, RANK, ALPHA)
    for i in range(count):
        agg.add(pool[i % POOL], 1.0 + i % 3)
    t_add = time.perf_counter() - t0
    agg.result()
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    return {
        "seconds": seconds,
        "add_seconds": t_add,
        "updates_per_s": count / seconds,
        "peak_rss": peak,
        "state_bytes": peak - before,
    }


@register("aggregation")
def aggregation(counts: tuple[int, ...] = COUNTS, methods: tuple[str, ...] = METHODS) -> Table:
    """Run every (method, count) in its own process and tabulate (TIES: only up to ``TIES_MAX``)."""
    results = []
    for method in methods:
        for count in counts:
            if method == "ties" and count > TIES_MAX:
                continue
            results.append((method, count, run_child("simulations.bench.aggregation", method, str(count))))
            print(method, count, results[-1][2], flush=True)
    return table(results)


def table(results: list[tuple[str, int, dict[str, float]]]) -> Table:
    """Tabulate (method, count, measure() output) triples."""
    out = Table(
        title="Aggregation throughput and memory (SmolLM2-135M shapes, r=8, 2.44M parameters per update)",
        command="python -m simulations.bench --only aggregation",
        header=["method", "updates", "seconds", "updates/s", "s per add", "result s", "peak RSS MB", "held MB"],
    )
    for method, count, r in results:
        out.rows.append(
            [
                method,
                f"{count:,}",
                f"{r['seconds']:.1f}",
                f"{r['updates_per_s']:.1f}",
                f"{r['add_seconds'] / count:.3f}",
                f"{r['seconds'] - r['add_seconds']:.1f}",
                f"{r['peak_rss'] / 1e6:.0f}",
                f"{r['state_bytes'] / 1e6:.0f}",
            ]
        )
    out.notes = [
        "seconds: all adds plus the one result() of a round (the SVD re-factorization for exact and ties)",
        "held MB: peak RSS minus RSS before the first add (the aggregator's running state and temporaries)",
        "fedavg/ffa hold one sum per factor (10 MB); exact and ties hold per-module dW-sized state "
        "(106M values: 0.42 GB for exact, 4 x 0.42 GB for ties' signed sums and weights)",
        f"ties stops at {TIES_MAX} updates here: 1,000 take ~25 min on 2 cores "
        "(measure with `python -m simulations.bench.aggregation ties 1000`); its state does not grow with the count",
        "each process: global adapter + a pool of 8 distinct client adapters, cycled",
    ]
    return out


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
