"""``python -m simulations.bench``: run every registered benchmark and rewrite BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess

import simulations.bench.aggregation  # noqa: F401  (registers)
import simulations.bench.agreement  # noqa: F401
import simulations.bench.branch  # noqa: F401
import simulations.bench.budget  # noqa: F401
import simulations.bench.edge  # noqa: F401
import simulations.bench.federated  # noqa: F401
import simulations.bench.inference  # noqa: F401
import simulations.bench.int4  # noqa: F401
import simulations.bench.prefix  # noqa: F401
import simulations.bench.privacy  # noqa: F401
import simulations.bench.ranks  # noqa: F401
import simulations.bench.scale  # noqa: F401
import simulations.bench.secure  # noqa: F401
import simulations.bench.shapes  # noqa: F401
import simulations.bench.stragglers  # noqa: F401
import simulations.bench.throughput  # noqa: F401
import simulations.bench.training  # noqa: F401
import simulations.bench.variants  # noqa: F401
from shared.model import cpu_flags, cpu_has_native_bf16
from simulations.bench import REGISTRY
from simulations.flower_local import ROOT


def cpu_model() -> str:
    """Return the CPU's model name (``/proc/cpuinfo``)."""
    with open("/proc/cpuinfo") as info:
        return next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())


def cpu_kind() -> str:
    """Name the CPU's class in short: figures measured on two classes are not comparable.

    The vendor and the widest vector / matrix unit torch and ONNX Runtime use: AVX2 only (AMD EPYC
    here), AVX-512, or AVX-512 + AMX; and whether bfloat16 is native (AVX512-BF16 / AMX) or emulated.
    """
    flags = cpu_flags()
    vendor = "amd" if "AMD" in cpu_model() else "intel"
    isa = "amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "x86"
    return f"{vendor}-{isa}{'-bf16' if cpu_has_native_bf16() else ''}"


def machine() -> str:
    """Return one line naming the machine a table was measured on: CPU, vector units, bf16, cores, memory."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    bf16 = "native bf16" if cpu_has_native_bf16() else "bf16 emulated"
    cores = os.cpu_count()
    return f"{cpu_model()} [{cpu_kind()}: {bf16}], {cores} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", choices=sorted(REGISTRY), help="run only these benchmarks")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    names = args.only or sorted(REGISTRY)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    stamp = f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {commit}, {machine()}"
    path = ROOT / "BENCHMARKS.md"
    sections = _sections(path.read_text()) if path.exists() else {}
    for name in names:
        result = REGISTRY[name]()
        text = "".join(t.markdown() for t in (result if isinstance(result, list) else [result]))
        print(text, flush=True)
        key = f"{name}@{cpu_kind()}"  # one section per benchmark and CPU class: the others' rows stay
        sections[key] = f"<!-- bench:{key} -->\n_Measured {stamp}._\n\n{text}"
        if not args.no_write:  # after each benchmark, so a long run that stops keeps what it measured
            path.write_text(HEAD + "\n".join(sections[n] for n in sorted(sections)))
            print(f"wrote the '{key}' section of {path}")


HEAD = """# Benchmarks

Written by `python -m simulations.bench` (all of them: `make bench`; one: `--only NAME`, which
rewrites only that section). Machines are shared and noisy: compare figures within one table,
not across tables.

Each section is kept per CPU class (`NAME@CLASS`, e.g. `amd-avx2`: AVX2 only, bf16 emulated;
`intel-avx512`: AVX-512 without bf16; `intel-amx-bf16`: AVX-512 + AMX, native bf16): our machines
change CPU between sessions, and figures of two classes are not comparable (bf16 alone is ~70x
apart in a backward pass). A re-run replaces only the section of the CPU it ran on.

"""


def _sections(text: str) -> dict[str, str]:
    """Split BENCHMARKS.md into its per-benchmark sections (kept when another one is re-run)."""
    parts = text.split("<!-- bench:")[1:]  # each keeps one blank line after it: the join adds none
    return {part.split(" -->", 1)[0]: "<!-- bench:" + part.rstrip() + "\n" for part in parts}


if __name__ == "__main__":
    main()
