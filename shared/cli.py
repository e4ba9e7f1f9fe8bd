"""The ``fleetlora`` command.

Each role registers its own subcommands through the ``fleetlora.commands`` entry-point
group (see ``pyproject.toml``; an entry point's name is its subcommand's), so this module
imports neither ``server`` nor ``client``. Only the module of the subcommand being run is
imported: ``fleetlora infer`` on an inference-only device (``fleetlora[edge]``) never loads
the coordinator's modules, nor torch. A subcommand whose role is not installed still shows
in ``--help`` and, run, names the module it misses and the extra that brings it.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import EntryPoint, entry_points


def python_module(module: str, *args: str) -> list[str]:
    """Return the command that runs ``python -m module args`` in this interpreter, for a child process.

    With ``-P``: no directory is put before the installed packages on ``sys.path``. ``python -m``
    puts the working directory first, so a package planted where the command runs (a ``shared/``
    beside a downloaded release) would be the one imported, by the signature check among others.
    """
    return [sys.executable, "-P", "-m", module, *args]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the parser with every registered subcommand, or only ``command``'s if it is registered."""
    parser = argparse.ArgumentParser(prog="fleetlora", description="Federated on-device LoRA adapter learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    points = sorted(entry_points(group="fleetlora.commands"), key=lambda e: e.name)
    chosen = [e for e in points if e.name == command] or points
    for ep in chosen:
        _register(ep, sub)
    return parser


def _register(ep: EntryPoint, sub: argparse._SubParsersAction) -> None:
    """Add ``ep``'s subcommand; if its module cannot be imported here, one that says why."""
    try:
        register = ep.load()
    except ImportError as exc:
        missing = exc.name or str(exc)
        # every word after the name is taken as it is (no options parsed): run, it only says what is missing
        p = sub.add_parser(ep.name, help=f"(not installed here: needs {missing})", add_help=False, prefix_chars="\0")
        p.add_argument("rest", nargs="*")
        p.set_defaults(func=lambda _: _unavailable(ep.name, missing))
        return
    register(sub)


def _unavailable(command: str, missing: str) -> int:
    raise RuntimeError(
        f"this install lacks {missing}, which `fleetlora {command}` needs: install the extra of the role that runs "
        "it, pip install 'fleetlora[server]' (coordinator), 'fleetlora[device]' (training device) or 'fleetlora[sim]'"
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``fleetlora``; errors that name their cause exit 2 without a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"fleetlora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
