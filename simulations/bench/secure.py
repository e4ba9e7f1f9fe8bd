"""Secure aggregation's cost: bytes and seconds per round with and without SecAgg+, and the held-out loss of both.

The same simulation per row pair, plain ``fedavg`` and ``fedavg`` with ``aggregation.secure =
true`` (SecAgg+, ``server/secure_rounds.py``), each run :data:`REPEATS` times alternating with the
other (one run's round times varied by 2x here: the better one is reported, every run's is shown),
at 4 and 20 virtual devices, with the tiny llama of
the tests and with SmolLM2-135M (4-bit base). Every device trains every round (``min-clients`` =
the device count). A masked round draws its batches from a seed of the run id too
(``client/train.round_seed``), so the two runs of a pair train on other batches and their held-out
losses differ by that, not only by SecAgg+'s quantization error (entries clipped to [-c, c] and
rounded to ``c / 2**k``; the sum's error is below ``n`` steps per entry, checked in
``tests/server/secagg/``). Tables measured before that change (commit 5ec30a8) drew the same batches.

The SecAgg+ runs are the secure demo's: its virtual devices are enrolled (``simulations.demo.enrol_devices``),
so each round has six exchanges, consistency among them (tables measured at commit 7b1eb74 or before
ran five, unenrolled). Bytes are payloads per device-round (array data, plus under
SecAgg+ the public keys with their signed proofs, encrypted shares, survivor lists and their
signatures); seconds are each trained round's wall time in the round log (from its first message
to its evaluation). Every device's cache is a fresh folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from shared.model import resolve_model
from simulations.bench import Table, register, restored_env
from simulations.bench.scale import _load_note, tiny_model

SMOLLM2 = {"train.steps": 2, "train.max-seq-len": 64, "eval.max-examples": 8}
TINY = {"train.steps": 2, "eval.max-examples": 8}
REPEATS = 2
"""Runs of each variant, alternating (plain, SecAgg+, plain, SecAgg+): one run's round times vary by up to 2x."""
ROWS = (("tiny", 4, 2), ("tiny", 20, 2), ("SmolLM2-135M", 4, 2), ("SmolLM2-135M", 20, 1))
"""(model, devices, rounds): SmolLM2 at 20 devices runs one round (40 device-trainings per pair)."""


def _run(overrides: dict[str, Any], devices: int, tmp: Path) -> dict[str, Any]:
    from simulations.demo import run_demo

    return run_demo(overrides, tmp / "out", tmp / "flwr", num_supernodes=devices)


def _figures(data: dict[str, Any]) -> dict[str, float]:
    """Mean seconds per trained round, mean bytes up / down per trained device-round, last held-out mean."""
    rounds = [r for r in data["rounds"] if r["round"] > 0]
    trained = [c for r in rounds for c in r["clients"].values() if "train_loss" in c]
    return {
        "seconds": sum(r["seconds"] for r in rounds) / len(rounds),
        "up": sum(c.get("bytes_up", 0) for c in trained) / len(trained),
        "down": sum(c.get("bytes_down", 0) for c in trained) / len(trained),
        "heldout": rounds[-1]["mean_heldout_loss"],
        "trained": len(trained) / len(rounds),
    }


def _pair(model: str, devices: int, rounds: int, path: str, folder: Path) -> dict[bool, dict[str, Any]]:
    """Run the plain and the secure simulation of one row pair, alternating, :data:`REPEATS` times each.

    Each one's figures are its first run's, with ``seconds`` the best of its runs and ``runs`` all of them.
    """
    base = {**(TINY if model == "tiny" else SMOLLM2), "model": path, "num-server-rounds": rounds}
    base |= {"min-clients": devices, "aggregation.method": "fedavg"}
    pair: dict[bool, dict[str, Any]] = {}
    for repeat in range(REPEATS):
        for secure_on in (False, True):
            name = f"{int(secure_on)}-{repeat}"
            os.environ["FLEETLORA_CACHE"] = str(folder / f"cache-{name}")  # no device pins another's base
            run = {**base, "aggregation.secure": secure_on, "run-name": f"secure-{name}"}
            got = _figures(_run(run, devices, folder / name))
            assert got["trained"] == devices, f"{got['trained']} of {devices} devices trained per round"
            first = pair.setdefault(secure_on, {**got, "runs": []})
            first["runs"].append(got["seconds"])
            first["seconds"] = min(first["runs"])
    return pair


def _ratio(model: str, devices: int, pair: dict[bool, dict[str, Any]]) -> str:
    on, off = pair[True], pair[False]
    return (
        f"{model}, {devices} devices: SecAgg+ / plain = {on['seconds'] / off['seconds']:.2f}x seconds per round, "
        f"{on['up'] / off['up']:.2f}x bytes up; held-out difference {abs(on['heldout'] - off['heldout']):.2g}"
    )


@register("secure")
def secure() -> Table:
    """Plain vs secure fedavg, side by side, at 4 and 20 devices, tiny model and SmolLM2."""
    table = Table(
        title="Secure aggregation (SecAgg+) vs plain: bytes and seconds per round, held-out loss (fedavg)",
        command="python -m simulations.bench --only secure",
        header=[
            "model",
            "devices",
            "rounds",
            "aggregation",
            "s / round (best; each run)",
            "KB up / device-round",
            "KB down / device-round",
            "held-out after last round",
        ],  # fmt: skip
    )
    load_before = os.getloadavg()[0]
    real = str(resolve_model("smollm2-135m-instruct"))  # before the devices' caches move
    with restored_env("FLEETLORA_CACHE"):  # the devices' caches move per run
        with tempfile.TemporaryDirectory() as tmp:
            tiny = str(tiny_model(Path(tmp) / "tiny"))
            for i, (model, devices, rounds) in enumerate(ROWS):
                pair = _pair(model, devices, rounds, tiny if model == "tiny" else real, Path(tmp) / str(i))
                for secure_on, f in pair.items():
                    table.rows.append([model, str(devices), str(rounds), "SecAgg+" if secure_on else "plain",
                                       f"{f['seconds']:.1f} ({', '.join(f'{x:.1f}' for x in f['runs'])})",
                                       f"{f['up'] / 1e3:,.0f}", f"{f['down'] / 1e3:,.0f}",
                                       f"{f['heldout']:.4f}"])  # fmt: skip
                table.notes.append(_ratio(model, devices, pair))
    table.notes.append(
        f"each variant ran {REPEATS} times, alternating with the other; s / round is the best run's mean over its "
        "trained rounds, bytes and held-out loss are the first run's (a masked round's batches depend on the run id)"
    )
    table.notes.append(
        f"every device trains every round ({SMOLLM2['train.steps']} steps x batch 4; SmolLM2 at "
        f"{SMOLLM2['train.max-seq-len']} tokens); evaluation on {SMOLLM2['eval.max-examples']} held-out examples per "
        "device; SecAgg+ with the defaults (5 shares, threshold 3, clip range 0.05, fp16 releases)"
    )
    table.notes.append(
        "bytes up under SecAgg+: each entry travels as a masked integer modulo 2**k (4 bytes, where the plain fp16 "
        "delta is 2), plus two public keys with their signed proof, the encrypted shares for each neighbour and a "
        "signed survivor list; bytes down add the neighbours' keys, proofs, shares and lists to the release"
    )
    table.notes.append(_load_note(load_before))
    return table
