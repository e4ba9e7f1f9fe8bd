"""The demo's last step: the edge runtime answers one held-out prompt per device domain, before and after.

A device's view: the signed 4-bit base is exported once to ONNX Runtime INT4
(``client/export.py``), the run's final signed adapter release is verified and applied
(``client/infer.py``), and each domain's first held-out question is answered greedily with the
base alone and with the federated adapter, next to the reference answer.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

from shared.data import load_jsonl

MAX_NEW_TOKENS = 48


def answer_per_domain(run: dict[str, Any]) -> str:
    """Return a printable before/after comparison for a finished run (its round log's ``run`` record)."""
    from client.infer import EdgeModel
    from shared.config import FleetConfig
    from shared.model import cache_dir
    from shared.release import follow_latest
    from shared.sign import TrustList

    cfg = FleetConfig.from_run_config(run["config"])
    releases = Path(run["releases"])  # <store>/adapter/<run-id>
    base = releases.parents[1] / "base"
    t0 = time.time()
    edge = EdgeModel(base, TrustList.load(cfg.signing.trust_file), cache_dir())
    manifest = edge.apply_release(follow_latest(releases))
    ready = time.time() - t0
    lines = [
        f"Edge inference (ONNX Runtime INT4, {edge.folder}; ready in {ready:.0f} s), "
        f"federated adapter = run {manifest.run_id} round {manifest.round} (signature verified):"
    ]
    for topic in cfg.topics:
        example = load_jsonl(Path(cfg.data_dir) / topic / "heldout.jsonl")[0]
        (_, question), (_, reference) = example.messages[0], example.messages[-1]
        before = _answer(edge, question, adapter=False)
        after = _answer(edge, question, adapter=True)
        lines += [f"\n[{topic}] {question}", f"  reference: {reference}"]
        lines += [_wrap("  base     : ", before), _wrap("  federated: ", after)]
    return "\n".join(lines)


def _answer(edge: Any, question: str, adapter: bool) -> str:
    return "".join(edge.generate(question, MAX_NEW_TOKENS, adapter=adapter)).strip().replace("\n", " ")


def _wrap(prefix: str, text: str) -> str:
    return textwrap.fill(text, width=110, initial_indent=prefix, subsequent_indent=" " * len(prefix))
