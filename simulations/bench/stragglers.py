"""One device 5x slower: wall time to the synchronous run's final held-out loss, sync vs FedBuff async.

The demo (real SmolLM2-135M, 4-bit base, 4 WordNet topics as 4 devices, fedavg, ``STEPS`` local steps) with device 3
(verb.motion) slow by construction (``train.device-slowdown = 1,1,1,5``: it waits 4x its own
training time after training, ``client/slowdown.py``), three times:

* sync, no timeout: every round waits for the slow device (3 rounds);
* sync, a round timeout that the fast devices meet and the slow one does not: it is dropped every
  round and its work is lost (3 rounds);
* async (``aggregation.mode = async``, buffer 2, max staleness 4): FedBuff, up to ``ASYNC_RELEASES``.

Every release of every run is scored the same way afterwards (the float reference base plus the
release's adapter, 64 held-out examples of each topic, mean over topics), so the runs' own
federated evaluation is off (``fraction-evaluate = 0``) and costs none of their wall time. A
release's time is its signed manifest's ``created`` minus release 0's. The four devices run at once
(Ray told of 4 CPUs, one per device), as four machines would; the slow one sleeps, so it
takes no CPU from the others.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from shared.adapter import ADAPTER_WEIGHTS, attach_lora, load_adapter_state
from shared.config import FleetConfig
from shared.data import encode, load_jsonl
from shared.manifest import parse
from shared.model import compute_dtype, load_model, load_tokenizer, resolve_model
from shared.release import MANIFEST, load_tensors, read_release
from simulations.bench import Table, register, restored_env
from simulations.bench.scale import _load_note
from simulations.demo import app_defaults, run_demo
from simulations.flower_local import ROOT

ASYNC_RELEASES = 8
SLOWDOWN = "1,1,1,5"
STEPS = 5  # per client-round (the demo's 15 would make the sync run alone ~30 min here: the slow device waits 4x)
COMMON = {"aggregation.method": "fedavg", "train.device-slowdown": SLOWDOWN, "fraction-evaluate": 0.0,
          "train.steps": STEPS}  # fmt: skip


def _run(name: str, overrides: dict[str, Any], folder: Path, model: str) -> tuple[dict[str, Any], Path]:
    os.environ["FLEETLORA_CACHE"] = str(folder / "cache")  # each run's devices pin their own base
    data = run_demo({**COMMON, **overrides, "model": model, "run-name": name}, folder / "out", folder / "flwr",
                    parallel=4)  # fmt: skip
    return data, Path(data["run"]["releases"])


def _releases(folder: Path) -> list[tuple[int, float, dict[str, Any]]]:
    """(round, seconds since release 0, adapter tensors) of every signed release in a run's release folder."""
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not (sub / MANIFEST).is_file():
            continue
        release = read_release(sub)
        manifest = parse(release.manifest_bytes)
        out.append((manifest.round, manifest.created_at().timestamp(), load_tensors(release.files[ADAPTER_WEIGHTS])))
    out.sort(key=lambda r: r[0])
    t0 = out[0][1]
    return [(n, created - t0, state) for n, created, state in out]


class _Scorer:
    """Mean held-out loss over the topics of one adapter state on the float reference base."""

    def __init__(self, model: str) -> None:
        self.cfg = FleetConfig.from_run_config({**app_defaults(), "model": model})
        self.tok = load_tokenizer(model)
        data_dir = (ROOT / self.cfg.data_dir).resolve()
        self.heldout = {
            t: [encode(e, self.tok, self.cfg.train.max_seq_len) for e in load_jsonl(data_dir / t / "heldout.jsonl")]
            for t in self.cfg.topics
        }
        self.model = attach_lora(load_model(model, compute_dtype(self.cfg.train.dtype)), self.cfg.lora, self.cfg.seed)

    def __call__(self, state: dict[str, Any]) -> float:
        from client.train import evaluate

        load_adapter_state(self.model, state)
        losses = [evaluate(self.model, ex, self.cfg.eval, self.tok.pad_token_id).loss for ex in self.heldout.values()]
        return sum(losses) / len(losses)


def _curve(folder: Path, score: _Scorer) -> list[tuple[int, float, float]]:
    return [(n, seconds, score(state)) for n, seconds, state in _releases(folder)]


def _reached(curve: list[tuple[int, float, float]], target: float) -> str:
    for n, seconds, loss in curve:
        if loss <= target + 1e-9:
            return f"{seconds:.0f} s (release {n})"
    return f"not reached in {curve[-1][0]} releases ({curve[-1][1]:.0f} s)"


def _slow_updates(data: dict[str, Any]) -> str:
    counted = sum(1 for r in data["rounds"] for c in r["clients"].values()
                  if c.get("name") == "verb.motion" and "train_loss" in c and "rejected" not in c)  # fmt: skip
    timed_out = sum(1 for r in data["rounds"] for c in r["clients"].values() if c.get("timed_out"))
    return f"{counted} counted, {timed_out} timed out"


@register("stragglers")
def stragglers() -> Table:
    """Run sync (no timeout), sync (timeout drops the slow device) and async side by side."""
    table = Table(
        title="A device 5x slower (by construction): wall time to the sync run's final held-out loss "
        "(SmolLM2-135M, 4 devices, fedavg)",
        command="python -m simulations.bench --only stragglers",
        header=["run", "releases", "final held-out", "slow device's updates", "time to sync's final loss",
                "held-out by release (s: loss)"],
    )  # fmt: skip
    load_before = os.getloadavg()[0]
    model = str(resolve_model("smollm2-135m-instruct"))
    with restored_env("FLEETLORA_CACHE"), tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        sync, sync_dir = _run("sync", {"round-timeout": 3600.0}, base / "sync", model)
        fast = [c["train_seconds"] for r in sync["rounds"] for c in r["clients"].values()
                if "train_seconds" in c and c.get("name") != "verb.motion"]  # fmt: skip
        timeout = 1.5 * max(fast) + 30  # the fast devices' slowest round, with margin; the slow one takes ~5x
        dropped, dropped_dir = _run("sync-timeout", {"round-timeout": timeout}, base / "timeout", model)
        async_overrides = {"aggregation.mode": "async", "aggregation.buffer-size": 2,
                           "num-server-rounds": ASYNC_RELEASES, "round-timeout": 3600.0}  # fmt: skip
        fedbuff, async_dir = _run("async", async_overrides, base / "async", model)
        score = _Scorer(model)
        curves = {name: _curve(folder, score) for name, folder in
                  (("sync", sync_dir), ("timeout", dropped_dir), ("async", async_dir))}  # fmt: skip
    target = curves["sync"][-1][2]
    labels = {"sync": "sync, no timeout", "timeout": f"sync, round timeout {timeout:.0f} s", "async": "async, buffer 2"}
    for name, data in (("sync", sync), ("timeout", dropped), ("async", fedbuff)):
        curve = curves[name]
        table.rows.append([
            labels[name], str(curve[-1][0]), f"{curve[-1][2]:.4f}", _slow_updates(data), _reached(curve, target),
            ", ".join(f"{s:.0f}: {loss:.3f}" for _, s, loss in curve),
        ])  # fmt: skip
    table.notes.append(
        f"device verb.motion waits 4x its training time after each training (train.device-slowdown = {SLOWDOWN}); "
        f"{STEPS} steps x batch 4 per client-round (the demo has 15), otherwise the demo's settings; "
        "the four devices run at once (Ray told of 4 CPUs, one per device, on 2 cores); time = a release's signed "
        "manifest created minus release 0's; every release scored afterwards on the float reference base, 64 "
        "held-out examples per topic, mean over the 4 topics (the runs' own federated evaluation off)"
    )
    table.notes.append(f"target = the sync run's final held-out loss, {target:.4f}")
    table.notes.append(_load_note(load_before))
    return table
