"""Scale and deployment: many virtual devices in simulation; a real local fleet vs a simulation.

* ``scale``: 1,000 virtual devices with a tiny llama (2 layers, d=64, SmolLM2's tokenizer), 1%
  sampled per round; and 100 virtual devices with SmolLM2-135M (4-bit base), 5% sampled per
  round, few steps on short sequences. One Flower simulation each (Ray backend, one device
  trains at a time: 2 CPUs per virtual client on a 2-core machine).
* ``deployment``: the same tiny model, devices and rounds as a local fleet on loopback
  (``server/fleet.py``: SuperLink with TLS and SuperNode auth, 3 SuperNodes, artifact service;
  every message starts a fresh ClientApp process) and as a simulation (3 virtual devices).

Wall time runs from starting the first Flower process to stopping the last; peak memory is the
largest sum of RSS over this process and all its descendants (sampled every 0.5 s); seconds per
round are the gaps between consecutive rounds' first results in the round log.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from simulations.bench import Table, register

DATA = Path(__file__).resolve().parents[1] / "data" / "wordnet"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TINY_RUN = {"train.steps": 2, "eval.max-examples": 8, "min-clients": 2, "aggregation.method": "fedavg"}


def tiny_model(folder: Path) -> Path:
    """Save a 2-layer llama (d=64) with SmolLM2's tokenizer as a Hugging Face folder (as the tests do)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.model import resolve_model

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    real = Path(resolve_model("smollm2-135m-instruct"))
    for name in TOKENIZER_FILES:
        if (real / name).is_file():
            shutil.copy(real / name, folder / name)
    return folder


class PeakRss:
    """Sample the summed RSS of this process and its descendants in a thread; keep the peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(0.5)


def measure(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run`` (returns a round log); return wall seconds, peak RSS, seconds per round and the log."""
    t0 = time.time()
    with PeakRss() as rss:
        data = run()
    starts = [r["started"] for r in sorted(data["rounds"], key=lambda r: r["round"])]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return {
        "wall": time.time() - t0,
        "peak": rss.peak,
        "per_round": sum(gaps) / len(gaps) if gaps else float("nan"),
        "data": data,
    }


def _simulate(overrides: dict[str, Any], devices: int, tmp: Path) -> dict[str, Any]:
    from simulations.demo import run_demo

    return measure(lambda: run_demo(overrides, tmp / "out", tmp / "flwr", num_supernodes=devices))


def _row(label: str, devices: int, sampled: str, m: dict[str, Any]) -> list[str]:
    rounds = [r for r in m["data"]["rounds"] if r["round"] > 0]
    trained = sum(1 for r in rounds for c in r["clients"].values() if "train_loss" in c)
    return [
        label,
        f"{devices:,}",
        sampled,
        str(len(rounds)),
        f"{trained / max(len(rounds), 1):.1f}",
        f"{m['wall']:.0f}",
        f"{m['per_round']:.1f}",
        f"{m['peak'] / 2**30:.2f}",
    ]


HEADER = ["run", "devices", "sampled / round", "rounds", "trained / round", "wall s", "s / round", "peak RSS GiB"]


@register("scale")
def scale() -> Table:
    """1,000 virtual devices (tiny model) and 100 (SmolLM2) in simulation."""
    table = Table(
        title="Scale: many virtual devices in one simulation (a sample trains each round)",
        command="python -m simulations.bench --only scale",
        header=HEADER,
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp) / "tiny")
        run = {**TINY_RUN, "model": str(tiny), "num-server-rounds": 3, "fraction-train": 0.01}
        run |= {"fraction-evaluate": 0.01, "run-name": "scale-1000"}
        m = _simulate(run, 1000, Path(tmp) / "a")
        table.rows.append(_row("tiny llama (2 layers, d=64)", 1000, "1% (10)", m))
        run = {"num-server-rounds": 2, "fraction-train": 0.05, "fraction-evaluate": 0.05, "min-clients": 2}
        run |= {"train.steps": 2, "train.max-seq-len": 64, "eval.max-examples": 8, "run-name": "scale-100"}
        m = _simulate(run, 100, Path(tmp) / "b")
        table.rows.append(_row("SmolLM2-135M, 4-bit base", 100, "5% (5)", m))
    table.notes.append(
        "tiny: 2 steps x batch 4 per device-round, fedavg; SmolLM2: 2 steps x batch 4 at 64 tokens, ties; "
        "evaluation on the same fraction of devices; round 0 is the initial evaluation"
    )
    table.notes.append(
        "virtual device i trains on WordNet topic i mod 4; devices share the machine's 2 cores "
        "(client-resources-num-cpus = 2: one trains at a time); the server quantizes SmolLM2 to 4 bits once per run"
    )
    table.notes.append(_load_note(load_before))
    return table


def _load_note(before: float) -> str:
    return (
        f"1-minute load average {before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores): on a shared "
        "machine, read the wall times as upper bounds and compare rows of one run"
    )


@register("deployment")
def deployment() -> Table:
    """Round latency: the tiny model on a local fleet (3 SuperNodes, TLS, auth) vs a 3-device simulation."""
    from server.fleet import LocalFleet, topic_devices

    table = Table(
        title="Deployment vs simulation: the same tiny model, 3 devices, 2 rounds (train + evaluate)",
        command="python -m simulations.bench --only deployment",
        header=HEADER,
    )
    topics = ["noun.animal", "noun.food", "noun.artifact"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp) / "tiny")
        run = {**TINY_RUN, "model": str(tiny), "num-server-rounds": 2, "topics": ",".join(topics)}

        def on_fleet() -> dict[str, Any]:
            with LocalFleet(Path(tmp) / "fleet", topic_devices(DATA, topics, 3)) as fleet:
                return fleet.run({**run, "run-name": "fleet"}, timeout=1800)

        m = measure(on_fleet)
        table.rows.append(_row("local fleet (SuperLink + 3 SuperNodes, TLS, auth)", 3, "all", m))
        m = _simulate({**run, "run-name": "sim"}, 3, Path(tmp) / "sim")
        table.rows.append(_row("simulation (3 virtual devices)", 3, "all", m))
    table.notes.append(
        "fleet wall time includes making certificates, registering the SuperNodes and starting every process; "
        "each fleet message starts a fresh ClientApp process (imports torch), a simulation reuses its Ray worker"
    )
    table.notes.append(_load_note(load_before))
    return table
