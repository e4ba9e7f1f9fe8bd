"""``fleetlora infer``: chat with the 4-bit base in ONNX Runtime, with a verified federated adapter.

One prompt on the command line answers it and exits; without one, every line on stdin is a
prompt (an interactive session). ``--adapter`` takes a signed release folder, or a run's
release folder with a ``LATEST`` file (the server's ``outputs/store/adapter/<run-id>``, or a
device's ``<cache>/adapter/<run-id>``, which each ``fleetlora fetch`` of that run advances): then,
before each prompt, a newer release is verified
and applied to the running session. A refused release is reported and the previous adapter
stays active. Releases are checked against the device's replay store (``--state``, shared with
``fleetlora fetch``), so a later session never goes back to an older round.

The base is the one the adapter's manifest names; of its releases in the device cache, the ONNX
base (``fleetlora fetch onnx``: loaded as verified, no torch needed) is preferred to the 4-bit
base (exported here once, with torch).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from client.generation import GenerationOptions
from shared.errors import ReleaseError
from shared.files import read_bounded
from shared.layout import PARTIAL, follow_latest, round_folder
from shared.manifest import MAX_SIGNATURE_BYTES, Manifest, read_manifest
from shared.model import cache_dir
from shared.onnx_base import RUN_ID, ExportOptions, is_onnx_base
from shared.release import MANIFEST, SIGNATURE
from shared.replay import AcceptedReleases, default_state_file
from shared.sign import SignatureError, TrustList

if TYPE_CHECKING:
    from client.infer import EdgeModel

HEAP_TRIM_BYTES = 128 * 1024
"""Free memory at the top of the heap beyond this is returned to the OS at once (glibc's default, held fixed)."""
M_TRIM_THRESHOLD = -1  # glibc's malloc.h


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
    p.add_argument(
        "--repetition-penalty", type=float,
        help="divide the logit of tokens already said by this (1 = off; default: the model's, else 1.1)",
    )  # fmt: skip
    p.add_argument(
        "--no-repeat-ngram", type=int,
        help="never repeat an n-gram of this size (0 = off; default: the model's, else 4)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    p.add_argument(
        "--output-bits", type=int, choices=(4, 8),
        help="exporting a 4-bit base: 8 = the trained 8-bit output layer (exact, default), 4 = re-quantized (faster)",
    )  # fmt: skip
    p.set_defaults(func=_infer)


def _infer(args: argparse.Namespace) -> int:
    from client.infer import EdgeModel

    return_freed_heap()
    if args.adapter is None and not args.no_adapter:
        raise ValueError("give --adapter <release folder> or --no-adapter")
    cache = args.cache or cache_dir()
    trust = TrustList.load(args.trust, in_child=True)  # cryptography never mapped here (shared/sign.py)
    base = args.base or _base_for(args.adapter, cache / "releases", trust)
    export = None if args.output_bits is None else ExportOptions(output_bits=args.output_bits)
    accepted = AcceptedReleases(args.state or default_state_file(cache / "releases"))
    first = None  # converted before the model loads: the device never holds both
    if args.adapter is not None and not args.no_adapter:
        try:
            first = follow_latest(args.adapter)
        except (ReleaseError, OSError) as exc:
            raise ReleaseError(f"adapter {args.adapter} refused: {exc}") from None
    try:
        model = EdgeModel(base, trust, cache, threads=args.threads, options=export, accepted=accepted, adapter=first)
    except ReleaseError as exc:
        fallback = _last_accepted(args.adapter, first, accepted)
        if fallback is None:
            raise
        print(f"[{exc}; round {fallback.name} of this run, the last this device accepted, serves]", file=sys.stderr)
        model = EdgeModel(base, trust, cache, threads=args.threads, options=export, accepted=accepted, adapter=fallback)
    if model.active is not None:
        _announce(model.active.manifest)
    options = _generation(args, model.generation)
    prompts = [args.prompt] if args.prompt else (line.strip() for line in sys.stdin)
    for prompt in prompts:
        if not prompt:
            continue
        if args.adapter is not None and not args.no_adapter:
            _follow(model, args.adapter)
        for piece in model.generate(prompt, adapter=not args.no_adapter, options=options):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0


def _generation(args: argparse.Namespace, defaults: GenerationOptions) -> GenerationOptions:
    """Return the model's generation defaults with what the command line sets (checked: ValueError names it)."""
    penalty, ngram = args.repetition_penalty, args.no_repeat_ngram
    return replace(
        defaults,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=defaults.repetition_penalty if penalty is None else penalty,
        no_repeat_ngram_size=defaults.no_repeat_ngram_size if ngram is None else ngram,
    )


def newest_base(releases: Path, digest: str | None = None, trust: TrustList | None = None) -> Path:
    """Return the base release in a device's release cache (of ``digest``, if given): ONNX first, then the newest.

    Manifests are read unverified to rank the candidates; with ``trust``, the first whose manifest
    signature verifies is taken, so that one unsigned ``manifest.json`` in the cache (dated in the
    future, say) cannot shadow the signed base beside it. ``EdgeModel`` then verifies it whole.
    Between equals, a folder named by its manifest's digest (as ``fetch`` stores one) comes first;
    an unfinished download (``*.partial``) is never a candidate.
    """
    bases = []
    for path in releases.glob(f"*/{MANIFEST}"):
        if path.parent.name.endswith(PARTIAL):
            continue
        try:
            m = read_manifest(path)
        except (OSError, ValueError):
            continue  # not a readable manifest: not a base this device can use
        if m.kind == "base" and digest in (None, m.base_digest):
            rank = (is_onnx_base(m.files), m.created, path.parent.name == m.digest(), str(path.parent))
            bases.append((rank, m))
    skipped = 0
    for (*_, folder), m in sorted(bases, key=lambda b: b[0], reverse=True):
        if trust is None or _signed(Path(folder), m, trust):
            return Path(folder)
        skipped += 1
    which = f"base release of base model {digest[:16]}" if digest else "base release"
    unsigned = f" ({skipped} whose signature does not verify skipped)" if skipped else ""
    raise ValueError(f"no {which} in {releases}{unsigned}; fetch it (fleetlora fetch base) or give --base")


def _signed(folder: Path, manifest: Manifest, trust: TrustList) -> bool:
    """Return whether ``manifest``, read from ``folder``, carries a valid signature of a trusted key there.

    Its bytes are its canonical form: :func:`shared.manifest.parse` accepts no other.
    """
    try:
        trust.verify(manifest.key_id, manifest.canonical(), read_bounded(folder / SIGNATURE, MAX_SIGNATURE_BYTES))
    except (OSError, SignatureError) as exc:
        print(f"[base {folder} skipped: {exc}]", file=sys.stderr)
        return False
    return True


def _base_for(adapter: Path | None, releases: Path, trust: TrustList | None = None) -> Path:
    """Return the cached base the adapter release names (the newest base without an adapter).

    The adapter's manifest is read here only to choose; ``EdgeModel`` verifies base and adapter.
    The server's own store (``<store>/onnx``, else ``<store>/base``, beside ``<store>/adapter/<run-id>``)
    counts too.
    """
    if adapter is None:
        return newest_base(releases, trust=trust)
    try:
        folder = follow_latest(adapter)
        digest = read_manifest(folder / MANIFEST).base_digest
    except (OSError, ValueError, ReleaseError):
        return newest_base(releases, trust=trust)  # EdgeModel reports what is wrong with the adapter
    parents = adapter.resolve().parents
    for name in (RUN_ID, "base") if len(parents) > 1 else ():  # the store's ONNX base first: nothing to export
        beside = parents[1] / name
        try:
            m = read_manifest(beside / MANIFEST)
        except (OSError, ValueError):
            continue
        if m.base_digest == digest and (trust is None or _signed(beside, m, trust)):
            return beside
    return newest_base(releases, digest, trust)


def _last_accepted(adapter: Path | None, refused: Path | None, accepted: AcceptedReleases) -> Path | None:
    """Return the folder of the round this device last accepted of the run folder ``adapter``, if not ``refused``.

    The run folder's name is its run id (as ``fetch`` and the coordinator lay them out); None when
    ``adapter`` is a release folder, or that round is not in it.
    """
    if adapter is None or refused is None or refused == adapter:  # a release folder given, not a run's
        return None
    number = accepted.accepted_round("adapter", Path(adapter).name)
    if number is None:
        return None
    folder = Path(adapter) / round_folder(number)
    return folder if folder != refused and folder.is_dir() else None


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
        _announce(manifest)


def _announce(manifest: Manifest) -> None:
    print(f"[adapter: run {manifest.run_id} round {manifest.round}, key {manifest.key_id}]", file=sys.stderr)


def return_freed_heap() -> bool:
    """Make glibc's malloc give freed memory back to the OS instead of keeping up to 64 MiB of it.

    glibc raises its trim threshold to twice the largest mmap-allocated block freed so far (and
    serves smaller blocks from the heap from then on): once the verified release files are freed
    (``correction.safetensors`` is 13 MB), up to twice that of freed heap stays resident for the
    life of the process. Fixing the threshold (``mallopt(M_TRIM_THRESHOLD)``, which also stops that
    adjustment) gave ~4 MB less peak RSS for ``fleetlora infer`` (SmolLM2 + a rank-8 adapter, 64
    tokens, AMD EPYC; 3 runs each, same time): ONNX Runtime's own arena serves the decode loop, which glibc's
    adjustment exists to spare. Returns whether it was set: glibc only, and an operator's
    ``MALLOC_TRIM_THRESHOLD_`` is kept.
    """
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):  # not glibc (musl, macOS)
        return False
    import ctypes

    return bool(ctypes.CDLL(None).mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_BYTES))
