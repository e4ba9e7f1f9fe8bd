"""What every run-config section checks with: the error a bad value raises, and the checks themselves."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A run-config key is unknown or its value is out of range."""


def check(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, its ``value`` and the ``rule`` it breaks, unless ``ok``."""
    if not ok:
        raise ConfigError(f"run-config '{key}' = {value!r} {rule}")


def number_in(text: str, low: float, high: float) -> bool:
    """Whether ``text`` (at most 8 ASCII characters) is a decimal number in [low, high]."""
    if len(text) > 8 or not text.isascii() or not text.replace(".", "", 1).isdigit():
        return False
    return low <= float(text) <= high
