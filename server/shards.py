"""``aggregation.workers``: exact / ties aggregated by Ray workers, each owning a shard of the modules.

:mod:`server.modulewise` aggregates one module at a time, and modules are independent: module m's
new factors depend only on module m's factors of the round's updates. So the modules are split into
``workers`` shards (largest first onto the lightest shard, by d_out x d_in: the work of exact and ties
is per entry), and each shard is one Ray actor holding its own :class:`server.modulewise.SpooledExact`
/ ``SpooledTies`` over just those modules, with its spool on its own node's disk. On receipt an
accepted delta is cut into its shards' keys and each piece goes to its actor (as safetensors bytes:
tensors travel as safetensors); at the end each actor aggregates its modules in parallel with the
others and returns only its new factors (the size of one adapter), which are joined. Data moves once,
as it arrives; no node holds more than its shard's spool; the result is the module-wise one.

Where the workers run: ``aggregation.ray-address`` empty starts a local Ray on this machine with one
CPU per worker (or joins the Ray this process already runs, e.g. a simulation's); otherwise it is
passed to ``ray.init(address=...)``: ``"auto"`` for a cluster this node belongs to, or
``"ray://<head>:10001"`` (Ray Client) for a remote one. Actors ask for no CPUs of Ray's scheduler
(a simulation's devices may hold all of them) and are spread over the cluster's nodes; each uses
its node's cores divided by the shards placed there as intra-op threads.

Ray is only in the ``sim`` extra; a coordinator that sets ``workers > 1`` installs it (``pip install ray``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server.aggregate import LORA_A, LORA_B, NoUpdatesError, State, modules

MAX_PENDING = 4  # deltas in flight per worker before ``add`` waits: bounds the object store, not the fleet


def shard_modules(global_state: Mapping[str, torch.Tensor], workers: int) -> list[list[str]]:
    """Split the modules into ``workers`` shards of about equal d_out x d_in (largest first, onto the lightest)."""
    sizes = {m: global_state[m + LORA_B].shape[0] * global_state[m + LORA_A].shape[1] for m in modules(global_state)}
    shards: list[list[str]] = [[] for _ in range(min(workers, len(sizes)) or 1)]
    load = [0] * len(shards)
    for m in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = load.index(min(load))
        shards[i].append(m)
        load[i] += sizes[m]
    return [sorted(s) for s in shards if s]


class _Shard:
    """One Ray actor: a module-wise aggregator over its shard's keys (created by :class:`Sharded`)."""

    def __init__(self, method: str, global_bytes: bytes, rank: int, alpha: float, density: float, lam: float,
                 dtype: str, threads_per_node: int) -> None:  # fmt: skip
        from server.modulewise import round_aggregator  # imported in the worker process

        shards_here = max(1, threads_per_node)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // shards_here))
        self._agg = round_aggregator(
            method, st_load(global_bytes), rank, alpha, density, lam, dtype=getattr(torch, dtype)
        )

    def add(self, delta_bytes: bytes, weight: float) -> None:
        self._agg.add(st_load(delta_bytes), weight)

    def result(self) -> bytes:
        return st_save({k: v.contiguous() for k, v in self._agg.result().items()})

    def close(self) -> None:
        self._agg.close()

    def peak_rss(self) -> int:
        """Return the worker process's peak RSS in bytes (``VmHWM``; the benchmark adds it to the coordinator's)."""
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


class Sharded:
    """exact / ties over ``workers`` Ray actors: ``add(delta, n)``, then ``result()`` once, as in modulewise."""

    def __init__(
        self,
        method: str,
        global_state: Mapping[str, torch.Tensor],
        rank: int,
        alpha: float,
        density: float,
        lam: float,
        dtype: torch.dtype,
        workers: int,
        address: str = "",
    ) -> None:
        if method not in ("exact", "ties"):
            raise ValueError(f"aggregation.workers shards exact and ties only, not '{method}' (it streams)")
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray ships with the sim and dev extras
            raise RuntimeError("aggregation.workers > 1 needs Ray on the coordinator: pip install ray") from exc
        self._ray = ray
        if not ray.is_initialized():
            init: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
            ray.init(**init, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self._shards = shard_modules(global_state, workers)
        self._keys = [[m + s for m in shard for s in (LORA_A, LORA_B)] for shard in self._shards]
        per_node = max(1, len(self._shards) // max(1, len(ray.nodes())))
        actor = ray.remote(num_cpus=0, scheduling_strategy="SPREAD", max_restarts=0)(_Shard)
        dtype_name = str(dtype).removeprefix("torch.")
        self._actors: list[Any] = [
            actor.remote(
                method,
                st_save({k: global_state[k].contiguous() for k in keys}),
                rank,
                alpha,
                density,
                lam,
                dtype_name,
                per_node,
            )  # fmt: skip
            for keys in self._keys
        ]
        self._pending: list[Any] = []
        self._count = 0
        self.worker_peak_rss: list[int] = []  # filled by ``result``: each worker's peak RSS, bytes

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        """Send each shard its keys of one delta; waits while ``MAX_PENDING`` deltas per worker are in flight."""
        for keys, actor in zip(self._keys, self._actors, strict=True):
            piece = st_save({k: delta[k].contiguous() for k in keys})
            self._pending.append(actor.add.remote(piece, float(weight)))
        self._count += 1
        while len(self._pending) > MAX_PENDING * len(self._actors):
            done, self._pending = self._ray.wait(self._pending, num_returns=len(self._actors))
            self._ray.get(done)  # a worker's error (a full spool) surfaces here, named

    def result(self) -> State:
        """Aggregate every shard in parallel and join their new factors; the workers are stopped either way."""
        try:
            if not self._count:
                raise NoUpdatesError("no updates to aggregate")
            self._ray.get(self._pending)
            self._pending = []
            out: State = {}
            for data in self._ray.get([a.result.remote() for a in self._actors]):
                out.update(st_load(data))
            self.worker_peak_rss = self._ray.get([a.peak_rss.remote() for a in self._actors])
            return out
        finally:
            self.close()

    def close(self) -> None:
        """Stop the workers (their spools go with them); idempotent."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._pending = [], []
