"""``key=value`` config arguments: formatted for Flower's ``--run-config`` / ``--node-config``, parsed from ours.

Flower splits such an argument into pairs (a value is ``'...'``, ``"..."`` or up to a space: an
escaped quote inside ``"..."`` ends it) and parses each value as TOML
(``flwr.common.config.parse_config_args``); what we format must survive that split.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from shared.config_checks import ConfigError


def toml_value(value: Any) -> str:
    """Format a value as Flower's ``--run-config`` parser (TOML) reads it: a bool, an int64, a float or a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError(f"a config integer must fit in 64 bits (Flower's config values), got {value}")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):  # a list or None would travel as its repr, a string the app never asked for
        raise ValueError(f"a config value is a bool, an integer, a float or a string, not {type(value).__name__}")
    text = value
    if '"' not in text:
        # a JSON string is a TOML basic string, given the characters as they are (TOML refuses JSON's surrogate
        # pairs) and DEL escaped (JSON leaves it, TOML refuses it raw)
        return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
    # Flower splits the argument with '"[^"]*"' before parsing TOML: an escaped quote would end the value, so a
    # TOML literal string, which has no escapes: no single quote, no control character
    if "'" in text or any(ord(c) < 0x20 and c != "\t" or c == "\x7f" for c in text):
        raise ValueError(f"a config value cannot hold both quote kinds or a control character: {text[:70]!r}")
    return f"'{text}'"


def config_arg(values: Mapping[str, Any]) -> str:
    """One ``--run-config`` / ``--node-config`` argument: space-separated ``key=value`` pairs."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse our commands' repeated ``--run-config KEY=VALUE`` (one pair each, so a value may hold spaces).

    Values are TOML scalars (``5``, ``1e-3``, ``"text"``) or bare strings (``ties``).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--run-config '{item}' is not KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        # a TOML date, array or table is not a config value: the words as they are (the config check says more)
        out[key.strip()] = value if isinstance(value, bool | int | float | str) else raw
    return out
