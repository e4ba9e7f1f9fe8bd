"""The coordinator's state store: runs, rounds and client results in SQLite, written as a run goes.

The round log (``server/report.py``) writes here after every change, so the store always holds
every round up to the last event; the dashboard (``server/dashboard/``) reads it, live or after
the run. The file is in WAL mode with ``synchronous=FULL``: every write is one committed
transaction, and a killed coordinator loses nothing that was committed; readers (the dashboard,
another process) never block the writer. The writer creates the file if needed and applies the
pending Alembic migrations (``revision.py``) first; a read-only handle opens the file with
SQLite's ``mode=ro`` and never creates, migrates or writes it.

Every value is cleaned before it is written (``rows.py``): a non-finite float, an integer SQLite
cannot hold or a value of the wrong type is stored as NULL, never a crash of the coordinator.

To resume a crashed coordinator, :meth:`StateStore.last_signed_round` names the newest signed
release of a run and where its folder is.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, delete, event, select, update
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.pool import QueuePool

from server.state.facts import round_privacy, round_secure, run_privacy
from server.state.revision import StateStoreError, check_revision, migrate
from server.state.rows import MAX_VALUE_BYTES, parse_round, plain, raw
from server.state.schema import client_results, rounds, runs
from server.state.values import (
    CLIENT_SETTINGS,
    MAX_ID,
    MAX_NAME,
    MAX_RANK,
    MAX_ROUND,
    finite,
    integer,
    node_id,
    text,
)

BUSY_TIMEOUT_MS = 10_000  # a reader or writer waits this long for another's lock before failing
_CLIENT_FLOATS = ("train_loss", "heldout_loss", "train_seconds", "update_norm")
_CLIENT_COUNTS = ("num_examples", "bytes_up", "bytes_down", "base_download_bytes")
_SHA256_HEX = re.compile("[0-9a-f]{64}")
_RUN_TEXT = ("model", "method", "base_digest", "base_format", "releases", "adapter")


@dataclass(frozen=True)
class SignedRound:
    """The newest signed adapter release of a run, as the store recorded it."""

    run_id: str
    round: int
    """0 is the initial adapter (signed before any training); n the aggregate of round n."""
    manifest_digest: str
    """SHA-256 (hex) of the release's canonical manifest; the next release names it as ``previous``."""
    key_id: str
    """Key id of the Ed25519 key that signed it."""
    signed_at: str
    """The manifest's creation time (UTC, ISO 8601)."""
    release_path: str
    """The release folder: PEFT files, ``manifest.json``, ``manifest.sig`` (``shared.release.read_release``)."""
    evaluated: bool
    """Whether the round's federated evaluation finished too (the round was closed)."""


class StateStore:
    """One SQLite state store; every write is its own committed transaction.

    Parameters
    ----------
    path
        The SQLite file. The writer creates it (with its folder) if missing and migrates it.
    read_only
        Open the file as the dashboard does: SQLite ``mode=ro`` plus ``PRAGMA query_only``, no
        file created, no migration; the schema revision is checked on open and on every
        :meth:`read`. Every write on this handle fails.

    Raises
    ------
    StateStoreError
        If the file is not SQLite, holds tables but no fleetlora schema, or was migrated by a
        newer fleetlora (a schema revision this one does not know). Read-only, also if the file
        is missing or at another revision than this fleetlora's newest.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path).expanduser().resolve()
        self.read_only = read_only
        if read_only:
            if not self.path.is_file():
                raise StateStoreError(
                    f"no state store at {self.path}: the coordinator creates it when a run starts (run config "
                    "state.db); check the path"
                )
            self.engine = _reader_engine(self.path)
            try:
                with self.read():
                    pass  # checks the revision, says why the file cannot be read
            except StateStoreError:
                self.engine.dispose()
                raise
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = _writer_engine(self.path)
        try:
            migrate(writer, self.path)
        except StateStoreError:
            writer.dispose()
            raise
        with writer.connect() as conn:  # only once it is ours: a refused file is left exactly as it was
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")  # persistent in the file
        self.engine = writer

    def close(self) -> None:
        """Close every pooled connection (the file stays consistent whether or not this is called)."""
        self.engine.dispose()

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """Yield a connection for queries (one consistent snapshot while it is open).

        Raises
        ------
        StateStoreError
            On a read-only handle, if the file is no longer at this fleetlora's schema revision
            (a newer coordinator migrated it) or no longer SQLite.
        """
        with self.engine.connect() as conn:
            if self.read_only:
                check_revision(conn, self.path)
            yield conn

    def save_run(self, run: Mapping[str, Any]) -> None:
        """Insert or update a run from the round log's ``run`` record (``run_id`` required).

        Its ``privacy`` (``facts.RunPrivacy``), when the run uses DP, goes to the ``dp_*`` columns.
        """
        config = plain(dict(run.get("config") or {}))
        row = {
            "run_id": str(run["run_id"]),
            "name": text(str(run.get("name") or config.get("run-name") or run["run_id"]), MAX_NAME),
            **{k: _text(run.get(k)) for k in _RUN_TEXT},
            "num_rounds": integer(run.get("rounds"), 0, MAX_ROUND),
            "min_clients": integer(run.get("min_clients"), 0, MAX_ROUND),
            "config": config,
            "started": _time(run.get("started")),
            "finished": finite(run.get("finished")),
            "wall_seconds": finite(run.get("wall_seconds")),
            **_columns("dp", run_privacy(_mapping(run.get("privacy")))),
        }
        with self.engine.begin() as conn:
            conn.execute(_upsert(runs, row, ["run_id"]))

    def save_round(self, run_id: str, rec: Mapping[str, Any], clients: Iterable[str] | None = None) -> None:
        """Insert or update round ``rec["round"]`` of ``run_id`` and its client results, in one transaction.

        Parameters
        ----------
        run_id
            A run saved before with :meth:`save_run`.
        rec
            The round log's record of the round: ``round``, ``started``, ``clients`` (key ->
            entry; the key is the client's node id, each entry's ``name`` what it reported),
            and once known ``seconds``, ``mean_*``, ``bytes_*``, ``release``, and ``privacy``
            when it released under DP (``facts.RoundPrivacy``; a value outside its bound is NULL), and
            ``secure`` when it ran secure aggregation (``facts.RoundSecure``).
        clients
            The keys of the clients whose entries changed (default: all of them).
        """
        started, seconds = _time(rec.get("started")), finite(rec.get("seconds"))
        release = rec.get("release") or {}
        row = {
            "run_id": run_id,
            "round": int(rec["round"]),
            "method": _text(rec.get("method")),
            "started": started,
            "closed": None if seconds is None else finite(started + seconds),
            "seconds": seconds,
            "mean_train_loss": finite(rec.get("mean_train_loss")),
            "mean_heldout_loss": finite(rec.get("mean_heldout_loss")),
            "bytes_up": integer(rec.get("bytes_up")),
            "bytes_down": integer(rec.get("bytes_down")),
            "manifest_digest": _text(release.get("manifest")),
            "key_id": _text(release.get("key_id")),
            "signed_at": _text(release.get("created")),
            "release_path": _text(release.get("path")),
            **_columns("dp", round_privacy(_mapping(rec.get("privacy")))),
            **_columns("secure", round_secure(_mapping(rec.get("secure")))),
        }
        keys = list(rec["clients"]) if clients is None else list(clients)
        with self.engine.begin() as conn:
            conn.execute(_upsert(rounds, row, ["run_id", "round"]))
            for key in keys:
                client_row = {"run_id": run_id, "round": row["round"], **_client_row(key, rec["clients"][key])}
                conn.execute(_upsert(client_results, client_row, ["run_id", "round", "client"]))

    def heard(self, run_id: str, at: float | None = None) -> None:
        """Record that the coordinator of ``run_id`` is alive (now, or at ``at``): its heartbeat."""
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(heard=_time(at)))

    def last_signed_round(self, run_id: str) -> SignedRound | None:
        """Return the newest signed adapter release of ``run_id``, or None if it has none (or no such run).

        A round is signed once its aggregate was signed and its release folder written, which
        happens before the round's evaluation: ``evaluated`` says whether that finished too. A
        round whose updates were all rejected publishes no release, so the answer is then the
        round before it, exactly the adapter the devices hold. A coordinator resuming the run
        loads ``release_path`` (verify it with ``shared.release.verify_release``), continues
        from round ``round + 1``, and chains its next manifest to ``manifest_digest``.
        """
        query = (
            select(*raw(rounds))
            .where(rounds.c.run_id == run_id, rounds.c.manifest_digest.is_not(None))
            .order_by(rounds.c.round.desc())
            .limit(1)
        )
        with self.read() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        parsed = parse_round(row)
        digest = None if parsed is None else parsed["manifest_digest"]
        if parsed is None or digest is None or not _SHA256_HEX.fullmatch(digest):  # fail closed: never guess
            raise StateStoreError(
                f"{self.path}: the newest signed round of run {run_id} is unreadable (round {row['round']!r}, "
                f"manifest {row['manifest_digest']!r}): the file was edited or damaged; restore it from a backup"
            )
        return SignedRound(
            run_id=run_id,
            round=parsed["round"],
            manifest_digest=digest,
            key_id=parsed["key_id"] or "",
            signed_at=parsed["signed_at"] or "",
            release_path=parsed["release_path"] or "",
            evaluated=parsed["closed"] is not None,
        )

    def drop_rounds_after(self, run_id: str, server_round: int) -> int:
        """Delete the rounds of ``run_id`` after ``server_round`` and their client results; return how many.

        A resumed run calls this with its resume point: later rounds were in flight when the
        coordinator stopped (never signed) and are run again, so their partial records go.
        """
        with self.engine.begin() as conn:
            later = (client_results.c.run_id == run_id, client_results.c.round > server_round)
            conn.execute(delete(client_results).where(*later))
            gone = conn.execute(delete(rounds).where(rounds.c.run_id == run_id, rounds.c.round > server_round))
        return int(gone.rowcount or 0)


def _decode(data: bytes) -> str:
    """Decode TEXT that is not valid UTF-8 with replacement characters instead of failing the whole query."""
    return data.decode("utf-8", "replace")


def _writer_engine(path: Path) -> Engine:
    # a creator, not "sqlite:///{path}": SQLAlchemy would read a '?' in the path as the URL's query
    engine = create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(path, check_same_thread=False), poolclass=QueuePool
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.text_factory = _decode
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    return engine


def _reader_engine(path: Path) -> Engine:
    """Return an engine whose connections open ``path`` with ``mode=ro``: SQLite never creates or writes it."""
    uri = f"file:{quote(str(path))}?mode=ro"  # quote: a '?', '#' or '%' in the path is not URI syntax

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)  # the pool hands it to other threads
        conn.text_factory = _decode
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA query_only = ON")  # a second lock: even a bug here cannot write
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)  # a larger value is refused unread (rows.py)
        return conn

    # "sqlite://" only names the dialect; without an explicit pool SQLAlchemy would treat it as :memory:
    return create_engine("sqlite://", creator=connect, poolclass=QueuePool)


def _upsert(table: Any, row: Mapping[str, Any], keys: list[str]) -> Any:
    stmt = insert(table).values(**row)
    return stmt.on_conflict_do_update(index_elements=keys, set_={k: v for k, v in row.items() if k not in keys})


def _mapping(value: Any) -> Mapping[str, Any]:
    """Return ``value`` if a mapping (the round log's ``privacy``, ``secure``), else an empty one: nothing to record."""
    return value if isinstance(value, Mapping) else {}


def _columns(prefix: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    """Name each parsed fact by its column (``epsilon`` -> ``dp_epsilon``, ``survivors`` -> ``secure_survivors``)."""
    return {f"{prefix}_{key}": value for key, value in facts.items()}


def _text(value: Any) -> str | None:
    return None if value is None else text(str(value))


def _time(value: Any) -> float:
    """Return a required timestamp: ``value`` if finite, else now (the closest time known; NOT NULL columns)."""
    parsed = finite(value)
    return time.time() if parsed is None else parsed


def _client_row(key: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Map a round-log client entry to a ``client_results`` row (status from what the entry holds).

    ``key`` is the round log's key of the entry (the node id); ``entry["name"]`` the name the
    client reported, stored as display text (the key when the entry has none).
    """
    if "rejected" in entry:
        status, reason = "rejected", _text(entry["rejected"])
    elif "refused_release" in entry:
        status, reason = "refused", _text(entry["refused_release"])
    elif "train_loss" in entry or "num_examples" in entry:  # an accepted update (its loss may be withheld)
        status, reason = "accepted", None
    else:
        status, reason = "evaluated", None
    client = str(key)[:MAX_ID]
    name = entry.get("name")
    return {
        "client": client,
        "name": text(name if isinstance(name, str) and name else client, MAX_NAME),
        "node_id": node_id(entry.get("node_id")),
        "status": status,
        "reason": reason,
        **{k: finite(entry.get(k)) for k in _CLIENT_FLOATS},
        **{k: integer(entry.get(k)) for k in _CLIENT_COUNTS},
        "lora_rank": integer(entry.get("lora_rank"), 1, MAX_RANK),
        **{k: integer(entry.get(k), low, high) for k, (low, high) in CLIENT_SETTINGS.items()},
    }
