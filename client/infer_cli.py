"""``fleetlora infer``: chat with the 4-bit base in ONNX Runtime, with a verified federated adapter.

One prompt on the command line answers it and exits; without one, every line on stdin is a
prompt (an interactive session). ``--adapter`` takes a signed release folder, or a run's
release folder with a ``LATEST`` file (the server's ``outputs/store/adapter/<run-id>``, or a
device's ``<cache>/adapter/<run-id>``, which each ``fleetlora fetch`` of that run advances): then,
before each prompt, a newer release is verified
and applied to the running session. A refused release is reported and the previous adapter
stays active. Releases are checked against the device's replay store (``--state``, shared with
``fleetlora fetch``), so a later session never goes back to an older round.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import ReleaseError
from shared.layout import follow_latest
from shared.manifest import parse
from shared.model import cache_dir
from shared.release import MANIFEST
from shared.replay import AcceptedReleases, default_state_file
from shared.sign import TrustList

if TYPE_CHECKING:
    from client.infer import EdgeModel


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``infer`` subcommand."""
    p = sub.add_parser("infer", help="answer prompts with the 4-bit base in ONNX Runtime and a verified adapter")
    p.add_argument("prompt", nargs="?", help="the prompt; without it, read one prompt per line from stdin")
    p.add_argument("--base", type=Path, help="signed 4-bit base folder (default: the newest in the device cache)")
    p.add_argument("--adapter", type=Path, help="signed adapter release folder, or a run folder with LATEST")
    p.add_argument("--no-adapter", action="store_true", help="answer with the base alone")
    p.add_argument("--trust", type=Path, default=Path(".fleetlora/keys/server.key.pub"), help="trust-list file")
    p.add_argument("--cache", type=Path, help="where exports are kept (default: ~/.cache/fleetlora)")
    p.add_argument(
        "--state", type=Path,
        help="replay store (default: <cache>/releases/accepted.json, the one fleetlora fetch keeps)",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    p.add_argument(
        "--output-bits", type=int, choices=(4, 8), default=8,
        help="output layer: 8 = the trained 8-bit weights (exact), 4 = re-quantized to 4 bits (faster)",
    )  # fmt: skip
    p.set_defaults(func=_infer)


def _infer(args: argparse.Namespace) -> int:
    from client.export import ExportOptions
    from client.infer import EdgeModel

    if args.adapter is None and not args.no_adapter:
        raise ValueError("give --adapter <release folder> or --no-adapter")
    cache = args.cache or cache_dir()
    base = args.base or newest_base(cache / "releases")
    options = ExportOptions(output_bits=args.output_bits)
    accepted = AcceptedReleases(args.state or default_state_file(cache / "releases"))
    trust = TrustList.load(args.trust)
    model = EdgeModel(base, trust, cache, threads=args.threads, options=options, accepted=accepted)
    prompts = [args.prompt] if args.prompt else (line.strip() for line in sys.stdin)
    for prompt in prompts:
        if not prompt:
            continue
        if args.adapter is not None and not args.no_adapter:
            _follow(model, args.adapter)
        for piece in model.generate(prompt, args.max_new_tokens, adapter=not args.no_adapter):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0


def newest_base(releases: Path) -> Path:
    """Return the most recently created base release in a device's release cache."""
    bases = []
    for manifest in releases.glob(f"*/{MANIFEST}"):
        try:
            m = parse(manifest.read_bytes())
        except ValueError:
            continue
        if m.kind == "base":
            bases.append((m.created, manifest.parent))
    if not bases:
        raise ValueError(f"no base release in {releases}; fetch one (fleetlora fetch base) or give --base")
    return max(bases)[1]


def _follow(model: EdgeModel, adapter: Path) -> None:
    """Apply the release ``adapter`` names if it is not the active one; report a refusal and go on."""
    folder, before = adapter, (model.active.name if model.active else None)
    try:
        folder = follow_latest(adapter)
        manifest = model.apply_release(folder)
    except (ReleaseError, OSError) as exc:
        if model.active is None:
            raise ReleaseError(f"adapter {folder} refused: {exc}") from None
        m = model.active.manifest
        print(f"[adapter {folder} refused: {exc}; round {m.round} of {m.run_id} stays active]", file=sys.stderr)
        return
    if model.active is not None and model.active.name != before:
        print(f"[adapter: run {manifest.run_id} round {manifest.round}, key {manifest.key_id}]", file=sys.stderr)
