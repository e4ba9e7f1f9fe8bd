"""``key=value`` config arguments: formatted for Flower's ``--run-config`` / ``--node-config``, parsed from ours.

Flower splits such an argument into pairs (a value is ``'...'``, ``"..."`` or up to a space: an
escaped quote inside ``"..."`` ends it) and parses each value as TOML
(``flwr.common.config.parse_config_args``); what we format must survive that split.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from typing import Any

from shared.config_checks import ConfigError


def toml_value(value: Any) -> str:
    """Format a value as Flower's ``--run-config`` parser (TOML) reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
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
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out
