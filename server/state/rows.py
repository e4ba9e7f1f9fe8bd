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
from collections.abc import Mapping
from typing import Any, TypedDict

from sqlalchemy import ColumnElement, Connection, Table, literal_column, select, type_coerce
from sqlalchemy.exc import DataError
from sqlalchemy.types import NullType

from server.state.facts import (
    ROUND_PRIVACY_KEYS,
    ROUND_SECURE_KEYS,
    RUN_PRIVACY_KEYS,
    RoundPrivacy,
    RoundSecure,
    RunPrivacy,
    prefixed,
    round_privacy,
    round_secure,
    run_privacy,
)
from server.state.schema import STATUSES
from server.state.values import (
    CLIENT_SETTINGS,
    INT64,
    MAX_NAME,
    MAX_RANK,
    MAX_ROUND,
    finite,
    ident,
    integer,
    node_id,
    text,
)

MAX_CONFIG_BYTES = 1 << 20
MAX_VALUE_BYTES = 8 << 20  # the longest value a reader loads: a config of MAX_CONFIG_BYTES characters, in UTF-8
ROWID: ColumnElement[int] = literal_column("rowid")
MAX_CONFIG_KEYS = 1000
Scalar = str | int | float | bool | None


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


def raw(table: Table) -> list[ColumnElement[Any]]:
    """Select every column of ``table`` as SQLite stored it (no SQLAlchemy type processing, e.g. JSON)."""
    return [type_coerce(column, NullType()).label(column.name) for column in table.c]


def raw_rows(conn: Connection, table: Table, *where: ColumnElement[bool]) -> list[Mapping[str, Any]]:
    """Return the rows of ``table`` matching ``where``, every column as :func:`raw` selects it.

    On a read-only connection SQLite refuses, unread, a value longer than ``MAX_VALUE_BYTES``
    (``SQLITE_LIMIT_LENGTH``; a 200 MB text cost 400 MB per dashboard request). Then the rows
    are read one by one and column by column: only that value is None, every other row and
    column is served.
    """
    try:
        return [dict(row) for row in conn.execute(select(*raw(table)).where(*where)).mappings()]
    except DataError:  # "string or blob too big"
        ids = conn.execute(select(ROWID).select_from(table).where(*where)).scalars().all()
        return [{c.name: _value(conn, table, c, rowid) for c in table.c} for rowid in ids]


def _value(conn: Connection, table: Table, column: ColumnElement[Any], rowid: int) -> Any:
    """Return one stored value (None if SQLite refuses it as too long)."""
    try:
        return conn.execute(select(type_coerce(column, NullType())).where(ROWID == rowid)).scalar()
    except DataError:
        return None


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
    secure: RoundSecure | None
    """None: the round did not run secure aggregation."""


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
    lora_rank: int | None
    """The rank the device trained at when below the run's, in [1, MAX_RANK]; None: the run's rank."""
    staleness: int | None
    """Async: releases signed since the one the update trained on (``release_round``)."""
    release_round: int | None
    contributions: int | None
    """Async: the device's accepted updates in the run up to this round."""
    memory_budget_mb: int | None
    """A device's ``memory-budget-mb``, and below what it chose to fit it."""
    micro_batch_size: int | None
    gradient_checkpointing: int | None


def parse_run(row: Any) -> RunRow | None:
    """Parse a raw ``runs`` row (a mapping, see :func:`raw`); None if its ``run_id`` is unusable."""
    run_id = ident(row["run_id"])
    if run_id is None:
        return None
    strings = {k: text(row[k]) for k in ("model", "method", "base_digest", "base_format", "releases", "adapter")}
    privacy = prefixed(row, "dp", RUN_PRIVACY_KEYS)
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
    privacy = prefixed(row, "dp", ROUND_PRIVACY_KEYS)
    secure = prefixed(row, "secure", ROUND_SECURE_KEYS)
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
        secure=None if secure is None else round_secure(secure),
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
        lora_rank=integer(row["lora_rank"], 1, MAX_RANK),
        staleness=_setting(row, "staleness"),
        release_round=_setting(row, "release_round"),
        contributions=_setting(row, "contributions"),
        memory_budget_mb=_setting(row, "memory_budget_mb"),
        micro_batch_size=_setting(row, "micro_batch_size"),
        gradient_checkpointing=_setting(row, "gradient_checkpointing"),
    )


def _setting(row: Any, column: str) -> int | None:
    """One of the 0006 columns of a client row, within its bounds (``values.CLIENT_SETTINGS``)."""
    low, high = CLIENT_SETTINGS[column]
    return integer(row[column], low, high)
