"""``python -m simulations.bench``: run every registered benchmark and rewrite BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess

import simulations.bench.aggregation  # noqa: F401  (registers)
import simulations.bench.branch  # noqa: F401
import simulations.bench.federated  # noqa: F401
import simulations.bench.inference  # noqa: F401
import simulations.bench.int4  # noqa: F401
import simulations.bench.scale  # noqa: F401
import simulations.bench.variants  # noqa: F401
from simulations.bench import REGISTRY
from simulations.flower_local import ROOT


def machine() -> str:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


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
        sections[name] = f"<!-- bench:{name} -->\n_Measured {stamp}._\n\n{text}"
        if not args.no_write:  # after each benchmark, so a long run that stops keeps what it measured
            path.write_text(HEAD + "\n".join(sections[n] for n in sorted(sections)))
            print(f"wrote the '{name}' section of {path}")


HEAD = """# Benchmarks

Written by `python -m simulations.bench` (all of them: `make bench`; one: `--only NAME`, which
rewrites only that section). Machines are shared and noisy: compare figures within one table,
not across tables.

"""


def _sections(text: str) -> dict[str, str]:
    """Split BENCHMARKS.md into its per-benchmark sections (kept when another one is re-run)."""
    parts = text.split("<!-- bench:")[1:]
    return {part.split(" -->", 1)[0]: "<!-- bench:" + part for part in parts}


if __name__ == "__main__":
    main()
