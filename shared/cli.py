"""The ``fleetlora`` command.

Each role registers its own subcommands through the ``fleetlora.commands`` entry-point
group (see ``pyproject.toml``), so this module imports neither ``server`` nor ``client``.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="fleetlora", description="Federated on-device LoRA adapter learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for ep in sorted(entry_points(group="fleetlora.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fleetlora``; errors that name their cause exit 2 without a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"fleetlora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
