"""The coordinator's state store: runs, rounds and client results in SQLite, written as a run goes.

The round log (``server/report.py``) writes here after every change, so the store always holds
every round up to the last event; the dashboard (``server/dashboard/``) reads it, live or after
the run. The file is in WAL mode with ``synchronous=FULL``: every write is one committed
transaction, and a killed coordinator loses nothing that was committed; readers (the dashboard,
another process) never block the writer. Opening a store creates the file if needed and applies
the pending Alembic migrations (``server/state/migrations/``) first.

To resume a crashed coordinator, :meth:`StateStore.last_signed_round` names the newest signed
release of a run and where its folder is.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, delete, event, inspect, select, update
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import DatabaseError

from server.state.schema import client_results, rounds, runs

MIGRATIONS = Path(__file__).with_name("migrations")
BUSY_TIMEOUT_MS = 10_000  # a reader or writer waits this long for another's lock before failing
_CLIENT_NUMBERS = (
    "num_examples",
    "train_loss",
    "heldout_loss",
    "train_seconds",
    "update_norm",
    "bytes_up",
    "bytes_down",
    "base_download_bytes",
)


class StateStoreError(RuntimeError):
    """The file is not a fleetlora state store, or one written by a newer fleetlora."""


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
        The SQLite file; created (with its folder) if missing.
    read_only
        Refuse every write on this handle (``PRAGMA query_only``), as the dashboard opens it.
        Migrations still run first, on a separate connection.

    Raises
    ------
    StateStoreError
        If the file is not SQLite, holds tables but no fleetlora schema, or was migrated by a
        newer fleetlora (a schema revision this one does not know).
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = _engine(self.path, read_only=False)
        try:
            migrate(writer, self.path)
        finally:
            writer.dispose()
        self.engine = _engine(self.path, read_only=read_only)

    def close(self) -> None:
        """Close every pooled connection (the file stays consistent whether or not this is called)."""
        self.engine.dispose()

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """Yield a connection for queries (one consistent snapshot while it is open)."""
        with self.engine.connect() as conn:
            yield conn

    def save_run(self, run: Mapping[str, Any]) -> None:
        """Insert or update a run from the round log's ``run`` record (``run_id`` required)."""
        config = dict(run.get("config", {}))
        row = {
            "run_id": str(run["run_id"]),
            "name": str(run.get("name") or config.get("run-name") or run["run_id"]),
            "model": run.get("model"),
            "method": run.get("method"),
            "base_digest": run.get("base_digest"),
            "base_format": run.get("base_format"),
            "num_rounds": run.get("rounds"),
            "min_clients": run.get("min_clients"),
            "releases": run.get("releases"),
            "config": json.loads(json.dumps(config, default=str)),  # plain JSON values only
            "started": float(run["started"]),
            "finished": run.get("finished"),
            "wall_seconds": run.get("wall_seconds"),
            "adapter": run.get("adapter"),
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
            The round log's record of the round: ``round``, ``started``, ``clients`` (name ->
            entry), and once known ``seconds``, ``mean_*``, ``bytes_*``, ``release``.
        clients
            The clients whose entries changed (default: all of them).
        """
        seconds = rec.get("seconds")
        release = rec.get("release", {})
        row = {
            "run_id": run_id,
            "round": int(rec["round"]),
            "method": rec.get("method"),
            "started": float(rec["started"]),
            "closed": None if seconds is None else float(rec["started"]) + float(seconds),
            "seconds": seconds,
            "mean_train_loss": rec.get("mean_train_loss"),
            "mean_heldout_loss": rec.get("mean_heldout_loss"),
            "bytes_up": rec.get("bytes_up"),
            "bytes_down": rec.get("bytes_down"),
            "manifest_digest": release.get("manifest"),
            "key_id": release.get("key_id"),
            "signed_at": release.get("created"),
            "release_path": release.get("path"),
        }
        names = list(rec["clients"]) if clients is None else list(clients)
        with self.engine.begin() as conn:
            conn.execute(_upsert(rounds, row, ["run_id", "round"]))
            for name in names:
                client_row = {"run_id": run_id, "round": row["round"], **_client_row(name, rec["clients"][name])}
                conn.execute(_upsert(client_results, client_row, ["run_id", "round", "client"]))

    def heard(self, run_id: str, at: float | None = None) -> None:
        """Record that the coordinator of ``run_id`` is alive (now, or at ``at``): its heartbeat."""
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.run_id == run_id).values(heard=time.time() if at is None else at))

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
            select(rounds)
            .where(rounds.c.run_id == run_id, rounds.c.manifest_digest.is_not(None))
            .order_by(rounds.c.round.desc())
            .limit(1)
        )
        with self.read() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return SignedRound(
            run_id=run_id,
            round=row["round"],
            manifest_digest=row["manifest_digest"],
            key_id=row["key_id"] or "",
            signed_at=row["signed_at"] or "",
            release_path=row["release_path"] or "",
            evaluated=row["closed"] is not None,
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


def migrate(engine: Engine, path: Path) -> str:
    """Bring the schema of ``engine``'s database to the newest revision; return that revision."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    assert head is not None
    try:
        with engine.begin() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            if current is None and set(inspect(conn).get_table_names()) - {"alembic_version"}:
                raise StateStoreError(f"{path} holds tables but no fleetlora state: not a state store")
            if current is not None and current not in {r.revision for r in script.walk_revisions()}:
                raise StateStoreError(
                    f"{path} is at schema revision {current}, which this fleetlora does not know "
                    "(a newer fleetlora wrote it): upgrade fleetlora to read it"
                )
            if current != head:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except DatabaseError as exc:
        raise StateStoreError(f"{path} is not a SQLite state store: {exc.orig}") from None
    return head


def _engine(path: Path, read_only: bool) -> Engine:
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not read_only:
            cur.execute("PRAGMA journal_mode = WAL")  # persistent in the file: set by the first writer
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        if read_only:
            cur.execute("PRAGMA query_only = ON")
        cur.close()

    return engine


def _upsert(table: Any, row: Mapping[str, Any], keys: list[str]) -> Any:
    stmt = insert(table).values(**row)
    return stmt.on_conflict_do_update(index_elements=keys, set_={k: v for k, v in row.items() if k not in keys})


def _client_row(name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Map a round-log client entry to a ``client_results`` row (status from what the entry holds)."""
    if "rejected" in entry:
        status, reason = "rejected", str(entry["rejected"])
    elif "refused_release" in entry:
        status, reason = "refused", str(entry["refused_release"])
    elif "train_loss" in entry:
        status, reason = "accepted", None
    else:
        status, reason = "evaluated", None
    node = entry.get("node_id")
    return {
        "client": name,
        "node_id": None if node is None else str(node),
        "status": status,
        "reason": reason,
        **{k: entry.get(k) for k in _CLIENT_NUMBERS},
    }
