"""Values in and out of the state store, parsed: finite floats, bounded integers, bounded text.

A row of the store is hostile input like any other: SQLite keeps whatever a column is given
(``inf`` in a REAL column, text in an INTEGER one, invalid JSON in ``config``), and the file can
be edited by anything that can write it. The writer (:mod:`server.state.store`) cleans every
value before it writes; the readers (:mod:`server.state.queries`) parse every row they read with
the ``parse_*`` functions here, so a value that is not what its column says shows as missing
(None) and a row whose key cannot be parsed is left out, never a crash or an HTTP 500.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, TypedDict

from sqlalchemy import ColumnElement, Table, type_coerce
from sqlalchemy.types import NullType

from server.state.schema import STATUSES

INT64 = 2**63  # SQLite's INTEGER is signed 64-bit: a Python int outside it cannot even be bound
NODE_ID_LIMIT = 2**64  # Flower node ids are unsigned 64-bit
MAX_ROUND = 2**31 - 1
MAX_ID = 256
"""Longest run id or client key kept (longer: the row is left out; writers truncate)."""
MAX_NAME = 200
"""Longest display name kept (a client's self-reported name, a run's name); longer ones are cut."""
MAX_TEXT = 4096
"""Longest reason, path or other free text kept; longer text is cut."""
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_KEYS = 1000
Scalar = str | int | float | bool | None


def finite(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None (NaN, inf, text, bytes, bool, out of range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def integer(value: Any, low: int = 0, high: int = INT64 - 1) -> int | None:
    """Return ``value`` as an int in ``[low, high]`` (a whole float counts), else None."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if low <= value <= high else None


def text(value: Any, limit: int = MAX_TEXT) -> str | None:
    """Return ``value`` if it is text, cut to ``limit`` characters; anything else is None."""
    if not isinstance(value, str):
        return None
    return value if len(value) <= limit else value[: limit - 1] + "…"


def within(value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float | None:
    """Return ``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``open_low``), else None."""
    number = finite(value)
    if number is None or not low <= number <= high or (open_low and number == low):
        return None
    return number


def ident(value: Any) -> str | None:
    """Return ``value`` if it is a non-empty identifier of at most :data:`MAX_ID` characters, else None."""
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID else None


def node_id(value: Any) -> str | None:
    """Return a Flower node id (an int, or its decimal text, in ``[0, 2**64)``) as decimal text, else None.

    Kept as text because JavaScript's numbers lose digits above 2**53.
    """
    if isinstance(value, str) and 0 < len(value) <= 20 and value.isascii() and value.isdigit():
        value = int(value)
    number = integer(value, 0, NODE_ID_LIMIT - 1)
    return None if number is None else str(number)


def plain(value: Any, depth: int = 0) -> Any:
    """Return ``value`` as plain JSON data: non-finite floats become None, other types their text."""
    if depth > 32:
        return None
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, float):
        return finite(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def config(value: Any) -> dict[str, Scalar]:
    """Parse a run's stored config (JSON text) into flat scalars; anything else reads as ``{}``.

    Keys must be text of at most :data:`MAX_ID` characters; values text (cut), bools, 64-bit
    integers, finite floats or null; other values (lists, objects, huge numbers) are left out.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or len(value) > MAX_CONFIG_BYTES:
        return {}
    try:
        data = json.loads(value, parse_constant=lambda _: None)  # NaN / Infinity read as missing
    except (ValueError, RecursionError):  # not JSON, a 5000-digit integer, nesting too deep
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Scalar] = {}
    for key, item in list(data.items())[:MAX_CONFIG_KEYS]:
        parsed = _scalar(item)
        if ident(key) is not None and (parsed is not None or item is None):
            out[key] = parsed
    return out


def _scalar(value: Any) -> Scalar:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return text(value)
    if isinstance(value, int):
        return integer(value, -INT64, INT64 - 1)
    return finite(value)


CLIPPING = ("server", "client")
"""Where a DP run clips each update: on the coordinator on receipt, or on the device before it leaves."""
MAX_POPULATION = 2**31 - 1


class RoundPrivacy(TypedDict):
    """What a round that released under client-level DP records (the round log's ``privacy``; ``dp_*`` columns)."""

    epsilon: float | None
    """The ε spent by the run so far (cumulative after this round, at ``delta``): finite, >= 0."""
    delta: float | None
    """In (0, 1)."""
    noise_multiplier: float | None
    """z, >= 0: the noise std on the mean is z * C / m."""
    clip_norm: float | None
    """C, > 0: the L2 bound of every contribution."""
    clipped_fraction: float | None
    """The share of the round's updates whose norm exceeded C, in [0, 1]."""
    sampling_rate: float | None
    """q, each device's chance to be sampled, in (0, 1]."""
    expected_clients: float | None
    """m = q * N, > 0: the mean's fixed denominator."""
    clipping: str | None
    """One of :data:`CLIPPING`."""


class RunPrivacy(TypedDict):
    """A DP run's facts (the round log run's ``privacy``; ``dp_*`` columns of ``runs``)."""

    delta: float | None
    max_epsilon: float | None
    """>= 0; None or 0 means no limit."""
    noise_multiplier: float | None
    clip_norm: float | None
    sampling_rate: float | None
    clipping: str | None
    population: int | None
    """The devices the sampling rate was computed over, in ``[0, MAX_POPULATION]``."""


def round_privacy(values: Mapping[str, Any]) -> RoundPrivacy:
    """Parse a round's privacy facts, each to its bound (see :class:`RoundPrivacy`); a value outside it is None.

    The one definition of the bounds: the writer cleans the round log's ``privacy`` with it, the
    readers each row's ``dp_*`` columns.
    """
    return RoundPrivacy(
        epsilon=within(values.get("epsilon"), 0.0),
        delta=_delta(values.get("delta")),
        noise_multiplier=within(values.get("noise_multiplier"), 0.0),
        clip_norm=within(values.get("clip_norm"), 0.0, open_low=True),
        clipped_fraction=within(values.get("clipped_fraction"), 0.0, 1.0),
        sampling_rate=within(values.get("sampling_rate"), 0.0, 1.0, open_low=True),
        expected_clients=within(values.get("expected_clients"), 0.0, MAX_POPULATION, open_low=True),
        clipping=_clipping(values.get("clipping")),
    )


def run_privacy(values: Mapping[str, Any]) -> RunPrivacy:
    """Parse a run's privacy facts, each to its bound (see :class:`RunPrivacy`); a value outside it is None.

    z, C and q have the bounds :func:`round_privacy` gives them.
    """
    mechanism = round_privacy(values)
    return RunPrivacy(
        delta=mechanism["delta"],
        max_epsilon=within(values.get("max_epsilon"), 0.0),
        noise_multiplier=mechanism["noise_multiplier"],
        clip_norm=mechanism["clip_norm"],
        sampling_rate=mechanism["sampling_rate"],
        clipping=mechanism["clipping"],
        population=integer(values.get("population"), 0, MAX_POPULATION),
    )


ROUND_PRIVACY_KEYS = tuple(RoundPrivacy.__annotations__)
RUN_PRIVACY_KEYS = tuple(RunPrivacy.__annotations__)


def dp_columns(row: Any, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """Return the ``dp_<key>`` columns of a raw row by key, or None when every one is NULL (no DP)."""
    values = {key: row[f"dp_{key}"] for key in keys}
    return None if all(v is None for v in values.values()) else values


def _delta(value: Any) -> float | None:
    delta = within(value, 0.0, 1.0, open_low=True)
    return None if delta == 1.0 else delta  # δ = 1 promises nothing


def _clipping(value: Any) -> str | None:
    return value if isinstance(value, str) and value in CLIPPING else None


def raw(table: Table) -> list[ColumnElement[Any]]:
    """Select every column of ``table`` as SQLite stored it (no SQLAlchemy type processing, e.g. JSON)."""
    return [type_coerce(column, NullType()).label(column.name) for column in table.c]


class RunRow(TypedDict):
    """A parsed ``runs`` row (see ``schema.runs``)."""

    run_id: str
    name: str
    model: str | None
    method: str | None
    base_digest: str | None
    base_format: str | None
    num_rounds: int | None
    min_clients: int | None
    releases: str | None
    config: dict[str, Scalar]
    started: float | None
    finished: float | None
    wall_seconds: float | None
    adapter: str | None
    heard: float | None
    privacy: RunPrivacy | None
    """None: the run did not use DP."""


class RoundRow(TypedDict):
    """A parsed ``rounds`` row (see ``schema.rounds``), without its run id."""

    round: int
    method: str | None
    started: float | None
    closed: float | None
    seconds: float | None
    mean_train_loss: float | None
    mean_heldout_loss: float | None
    bytes_up: int | None
    bytes_down: int | None
    manifest_digest: str | None
    key_id: str | None
    signed_at: str | None
    release_path: str | None
    privacy: RoundPrivacy | None
    """None: the round released nothing under DP."""


class ClientRow(TypedDict):
    """A parsed ``client_results`` row: ``client`` is the key (the node id), ``name`` display text only."""

    round: int
    client: str
    name: str
    node_id: str | None
    status: str | None
    """One of ``schema.STATUSES``, or None for anything else."""
    reason: str | None
    num_examples: int | None
    train_loss: float | None
    heldout_loss: float | None
    train_seconds: float | None
    update_norm: float | None
    bytes_up: int | None
    bytes_down: int | None
    base_download_bytes: int | None


def parse_run(row: Any) -> RunRow | None:
    """Parse a raw ``runs`` row (a mapping, see :func:`raw`); None if its ``run_id`` is unusable."""
    run_id = ident(row["run_id"])
    if run_id is None:
        return None
    strings = {k: text(row[k]) for k in ("model", "method", "base_digest", "base_format", "releases", "adapter")}
    privacy = dp_columns(row, RUN_PRIVACY_KEYS)
    return RunRow(
        run_id=run_id,
        name=text(row["name"], MAX_NAME) or run_id,
        model=strings["model"],
        method=strings["method"],
        base_digest=strings["base_digest"],
        base_format=strings["base_format"],
        num_rounds=integer(row["num_rounds"], 0, MAX_ROUND),
        min_clients=integer(row["min_clients"], 0, MAX_ROUND),
        releases=strings["releases"],
        config=config(row["config"]),
        started=finite(row["started"]),
        finished=finite(row["finished"]),
        wall_seconds=finite(row["wall_seconds"]),
        adapter=strings["adapter"],
        heard=finite(row["heard"]),
        privacy=None if privacy is None else run_privacy(privacy),
    )


def parse_round(row: Any) -> RoundRow | None:
    """Parse a raw ``rounds`` row; None if its round number is unusable."""
    number = integer(row["round"], 0, MAX_ROUND)
    if number is None:
        return None
    privacy = dp_columns(row, ROUND_PRIVACY_KEYS)
    return RoundRow(
        round=number,
        method=text(row["method"]),
        started=finite(row["started"]),
        closed=finite(row["closed"]),
        seconds=finite(row["seconds"]),
        mean_train_loss=finite(row["mean_train_loss"]),
        mean_heldout_loss=finite(row["mean_heldout_loss"]),
        bytes_up=integer(row["bytes_up"]),
        bytes_down=integer(row["bytes_down"]),
        manifest_digest=text(row["manifest_digest"]),
        key_id=text(row["key_id"]),
        signed_at=text(row["signed_at"]),
        release_path=text(row["release_path"]),
        privacy=None if privacy is None else round_privacy(privacy),
    )


def parse_client(row: Any) -> ClientRow | None:
    """Parse a raw ``client_results`` row; None if its round or client key is unusable."""
    number, key = integer(row["round"], 0, MAX_ROUND), ident(row["client"])
    if number is None or key is None:
        return None
    status = row["status"] if row["status"] in STATUSES else None
    return ClientRow(
        round=number,
        client=key,
        name=text(row["name"], MAX_NAME) or key,
        node_id=node_id(row["node_id"]),
        status=status,
        reason=text(row["reason"]),
        num_examples=integer(row["num_examples"]),
        train_loss=finite(row["train_loss"]),
        heldout_loss=finite(row["heldout_loss"]),
        train_seconds=finite(row["train_seconds"]),
        update_norm=finite(row["update_norm"]),
        bytes_up=integer(row["bytes_up"]),
        bytes_down=integer(row["bytes_down"]),
        base_download_bytes=integer(row["base_download_bytes"]),
    )
