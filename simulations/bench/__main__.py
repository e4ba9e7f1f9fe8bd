"""``python -m simulations.bench``: run every registered benchmark and rewrite BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess

import simulations.bench.federated  # noqa: F401  (registers)
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
    sections = []
    for name in names:
        result = REGISTRY[name]()
        for table in result if isinstance(result, list) else [result]:
            print(table.markdown(), flush=True)
            sections.append(table.markdown())
    if args.no_write:
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    head = [
        "# Benchmarks",
        "",
        "Written by `python -m simulations.bench` (all of them: `make bench`). Machines are shared and noisy:",
        "compare figures within one run, not across runs.",
        "",
        f"- machine: {machine()}",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {commit}",
        "",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(head) + "\n" + "\n".join(sections))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
