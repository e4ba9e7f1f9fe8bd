"""An inference-only device: a fresh ``fleetlora[edge]`` venv, its size, and ``fleetlora infer``'s peak RSS.

Self-contained (no ``make demo`` needed): the embedded SmolLM2-135M-Instruct is quantized and signed
with a key made for the benchmark, exported to ONNX and signed as the coordinator's ONNX base (what
``fleetlora export`` + ``fleetlora publish-onnx`` do), and a rank-8 LoRA over every linear layer
(the demo's shape: the same files and bytes; its values do not change memory or speed) is signed
as round 1 of a run. This tree is installed with ``pip install '.[edge]'`` (dependencies from the
package registry) into a fresh venv, whose own ``fleetlora infer`` then verifies and answers one
prompt; each command runs three times, alternating. Peak RSS by ``/usr/bin/time -f %M`` (the
process's own: a child forked by this large benchmark process would report the parent's RSS, which
Linux keeps across ``execve``).

The mapped libraries' share of that peak depends on how their files sit in the page cache: right
after ``pip`` wrote them, a fault maps more of each file than after they were read back from disk
(measured: 18 MiB more for byte-identical files). So every command runs twice over: with the page
cache as the install left it, and (where this process may write ``/proc/sys/vm/drop_caches``, i.e.
as root) after dropping the page cache before each run, as a device finds it after a reboot.
Dropping it slows whatever else runs on the machine for a while.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from simulations.bench import Table, register

THREADS, NEW_TOKENS, RUNS = 2, 64, 3
PROMPT = "Define 'otter'."
SOURCES = ("pyproject.toml", "README.md", "client", "server", "shared")
PIP_CACHE = Path(os.environ.get("FLEETLORA_WHEEL_CACHE", "/tmp/fleetlora-pip-cache"))
MIB, MB = 1 << 20, 10**6
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
AS_INSTALLED, AFTER_REBOOT = "page cache as the install left it", "page cache dropped first (as after a reboot)"


def _edge_venv(root: Path) -> Path:
    """Install this tree's ``[edge]`` into a fresh venv under ``root``; return the venv."""
    from simulations.flower_local import ROOT

    src, venv = root / "src", root / "venv"
    src.mkdir()
    for name in SOURCES:  # a copy: pip builds in the source tree
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    cmd = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    cmd += ["--disable-pip-version-check", "--cache-dir", str(PIP_CACHE), f"{src}[edge]"]
    subprocess.run(cmd, check=True, capture_output=True)
    return venv


def _releases(root: Path) -> tuple[Path, Path, Path]:
    """Sign the 4-bit base, its ONNX export and a rank-8 adapter under ``root``; return (store, run, trust file)."""
    import torch

    from client.export import export_base
    from server.onnx_release import publish_onnx_base
    from server.quantize import publish_base
    from shared.adapter import adapter_config_bytes, adapter_state, attach_lora
    from shared.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from shared.config import LoraConfig
    from shared.layout import point_latest
    from shared.model import load_model, model_digest, resolve_model
    from shared.release import make_release, save_tensors, write_release
    from shared.sign import generate_key

    key = generate_key(root / "keys" / "bench.key")
    store = root / "store"
    _, base = publish_base(resolve_model("smollm2-135m-instruct"), model_digest("smollm2-135m-instruct"), store, key)
    publish_onnx_base(export_base(store / "base", root / "cache"), store, key)
    model = attach_lora(load_model(str(store / "base"), torch.float32), LoraConfig(rank=8), seed=0)
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model).items()}
    files = {ADAPTER_CONFIG: adapter_config_bytes(model, str(store / "base")), ADAPTER_WEIGHTS: save_tensors(state)}
    release, _ = make_release(
        files, kind="adapter", run_id="bench", round=1, base_digest=base.base_digest, method="fedavg", key=key
    )
    run = store / "adapter" / "bench"
    write_release(release, run / "round-0001")
    point_latest(run, "round-0001")
    return store, run, root / "keys" / "bench.key.pub"


_REPORT = (
    "import atexit, sys, threading, time\n"
    "top = [0, 0, 0]\n"
    "def sample():\n"
    "    while True:\n"
    "        status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
    "        now = [int(status[k].split()[0]) for k in ('VmRSS', 'RssAnon', 'RssFile')]\n"
    "        if now[0] > top[0]:\n"
    "            top[:] = now\n"
    "        time.sleep(0.005)\n"
    "threading.Thread(target=sample, daemon=True).start()\n"
    "atexit.register(lambda: print('STATUS', *top, file=sys.stderr))\n"
    "from shared.cli import main\n"
    "sys.argv[0] = 'fleetlora'\n"
    "sys.exit(main())\n"
)  # the command itself (``shared.cli:main``, what ``fleetlora`` runs); a thread samples its RSS every 5 ms


def _infer(venv: Path, args: list[str], cache: Path) -> dict[str, float]:
    """Run the venv's ``fleetlora infer`` under ``/usr/bin/time``: its peak RSS, that peak's parts and wall time."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cache)}
    cmd = ["/usr/bin/time", "-f", "TIME %M %e", str(venv / "bin" / "python"), "-c", _REPORT, "infer", *args]
    cmd += ["--cache", str(cache), "--state", str(cache / "accepted.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    timed = re.search(r"TIME (\d+) ([\d.]+)", done.stderr)
    status = re.search(r"STATUS (\d+) (\d+) (\d+)", done.stderr)
    if done.returncode != 0 or timed is None or status is None:
        raise RuntimeError(f"fleetlora infer failed ({done.returncode}): {done.stderr[-2000:]}")
    _, anon, file = (int(v) * 1024 for v in status.groups())
    return {"peak": int(timed.group(1)) * 1024, "wall": float(timed.group(2)), "anon": anon, "file": file}


def _import_seconds(venv: Path) -> float:
    """Median over three fresh interpreters of ``-X importtime``'s cumulative time for what infer imports."""
    names = ("client.infer_cli", "client.infer", "onnxruntime_genai")
    code = "import " + ", ".join(names)
    runs = []
    for _ in range(RUNS):
        err = subprocess.run(
            [str(venv / "bin" / "python"), "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
        ).stderr
        total = 0
        for line in err.splitlines():
            parts = line.removeprefix("import time:").split("|")
            if len(parts) == 3 and parts[2].removeprefix(" ") in names:  # top level: one space (nested: more)
                total += int(parts[1])
        runs.append(total / 1e6)
    return statistics.median(runs)


def _size_mb(venv: Path) -> float:
    """Size of the venv's site-packages in MiB (``du -sm``)."""
    out = subprocess.run(["du", "-sm", *venv.glob("lib/python*/site-packages")], capture_output=True, text=True)
    return float(out.stdout.split()[0])


@register("edge")
def bench() -> Table:
    """Install ``[edge]``, sign the releases, then run ``fleetlora infer`` with and without the adapter."""
    with tempfile.TemporaryDirectory(prefix="fleetlora-edge-bench-") as tmp:
        root = Path(tmp)
        store, run, trust = _releases(root)
        venv = _edge_venv(root)
        common = ["--base", str(store / "onnx"), "--trust", str(trust), "--threads", str(THREADS)]
        common += ["--max-new-tokens", str(NEW_TOKENS)]
        variants = {
            "`--adapter <run>` (verify base + adapter, convert, load, answer)": ["--adapter", str(run)],
            "`--no-adapter`": ["--no-adapter"],
        }
        cold = os.access(DROP_CACHES, os.W_OK)
        load_before = os.getloadavg()[0]
        results: dict[str, list[dict[str, float]]] = {}
        for state in (AS_INSTALLED, AFTER_REBOOT) if cold else (AS_INSTALLED,):
            for _ in range(RUNS):
                for name, extra in variants.items():
                    if state == AFTER_REBOOT:
                        _drop_page_cache()
                    measured = _infer(venv, [*common, *extra, PROMPT], root / "device")
                    results.setdefault(f"{name}, {state}", []).append(measured)
        load_after = os.getloadavg()[0]
        size, imports = _size_mb(venv), _import_seconds(venv)
        base_mb = sum(f.stat().st_size for f in (store / "onnx").iterdir()) / MB
    table = Table(
        "An inference-only device: `fleetlora infer` from a fresh `[edge]` venv",
        "python -m simulations.bench --only edge",
        [
            "`fleetlora infer …`",
            "peak RSS (MiB)",
            "peak RSS (MB)",
            "at the peak: anonymous + file-backed (MiB)",
            "wall (s)",
        ],
    )
    for name, runs in results.items():
        table.rows.append(
            [
                name,
                ", ".join(f"{r['peak'] / MIB:.0f}" for r in runs),
                ", ".join(f"{r['peak'] / MB:.0f}" for r in runs),
                ", ".join(f"{r['anon'] / MIB:.0f} + {r['file'] / MIB:.0f}" for r in runs),
                ", ".join(f"{r['wall']:.1f}" for r in runs),
            ]
        )
    table.notes += [
        f"`[edge]` venv: {size:.0f} MiB of site-packages (`du -sm`); importing what `fleetlora infer` imports "
        f"(`client.infer_cli`, `client.infer`, `onnxruntime_genai`; `-X importtime`, cumulative): {imports:.2f} s "
        "(median of 3 fresh interpreters)",
        f"SmolLM2-135M-Instruct: the signed ONNX base ({base_mb:.1f} MB) and a signed rank-8 LoRA over every "
        f"linear layer; one prompt ({PROMPT!r}), at most {NEW_TOKENS} new tokens, `--threads {THREADS}`; "
        f"{RUNS} runs of each command, alternating; 1 MiB = 2^20 bytes, 1 MB = 10^6",
        "the adapter is verified, then converted to `.onnx_adapter` in a child process (`python -m "
        "client.onnx_adapter`, handed the verified bytes) before the model loads; the serving process imports "
        "neither numpy's conversion code nor onnxruntime's Python API, nor cryptography (each signature is "
        "checked in a child process, `python -m shared.sign`); after the model loads, the clean pages of its "
        "own files are dropped from the process (`client/residency.py`)",
        "the peak's parts: RssAnon and RssFile when a thread sampling the process's own RSS every 5 ms saw it "
        "highest; file-backed pages (mapped libraries, the mapped embedding rows, the adapter file) depend on "
        "the kernel's page cache (hence the two states), not only on the code; the anonymous part is the code's",
        f"1-minute load average {load_before:.1f} before, {load_after:.1f} after (2 cores)",
    ]
    if not cold:
        table.notes.append(f"not measured after a reboot: this process may not write {DROP_CACHES} (needs root)")
    return table


def _drop_page_cache() -> None:
    """Write dirty pages back, then drop the clean page cache (``drop_caches`` = 1): files are read from disk again."""
    os.sync()
    DROP_CACHES.write_text("1\n")
