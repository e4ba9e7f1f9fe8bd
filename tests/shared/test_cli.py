"""The fleetlora command: a subcommand whose role is not installed is listed and, run, says what to install."""

import argparse
from importlib.metadata import EntryPoint

import pytest

from shared.cli import _register, build_parser


def test_a_subcommand_of_a_role_not_installed_names_what_it_lacks():
    parser = argparse.ArgumentParser(prog="fleetlora")
    sub = parser.add_subparsers(dest="command", required=True)
    _register(EntryPoint("ghost", "no_such_role_module:register", "fleetlora.commands"), sub)
    assert "not installed here: needs no_such_role_module" in parser.format_help()
    args = parser.parse_args(["ghost", "--any", "flag"])
    with pytest.raises(RuntimeError, match=r"lacks no_such_role_module.*fleetlora\[server\]"):
        args.func(args)


def test_only_the_subcommand_run_is_registered_and_help_lists_them_all():
    one = build_parser("verify")._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert list(one) == ["verify"]
    every = build_parser(None)._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"verify", "infer", "fetch", "keys"} <= set(every)
