"""The state store's schema revision: the writer migrates it, a reader only checks it.

The coordinator (the writer) brings a store to this fleetlora's newest revision on open
(:func:`migrate`, Alembic, ``migrations/``). A read-only handle, as the dashboard opens it,
never writes: :func:`check_revision` refuses a store at any other revision with a message that
says what to do, since the queries are written for exactly this schema.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import DatabaseError

MIGRATIONS = Path(__file__).with_name("migrations")


class StateStoreError(RuntimeError):
    """The file is not a fleetlora state store, or not at a schema revision this fleetlora can use."""


def _script() -> tuple[Config, ScriptDirectory]:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg, ScriptDirectory.from_config(cfg)


@functools.cache
def _revisions() -> tuple[str, frozenset[str]]:
    """Return this fleetlora's newest revision and every one it knows (read once: readers check per query)."""
    script = _script()[1]
    newest = script.get_current_head()
    assert newest is not None, "no migrations in server/state/migrations/versions"
    return newest, frozenset(r.revision for r in script.walk_revisions())


def head() -> str:
    """Return this fleetlora's newest schema revision."""
    return _revisions()[0]


def _current(conn: Connection, path: Path) -> str | None:
    """Return the store's revision (None: no schema yet); refuse a foreign or newer one."""
    known = _revisions()[1]
    try:
        current = MigrationContext.configure(conn).get_current_revision()
    except CommandError as exc:  # more than one row in alembic_version: no single revision to trust
        raise StateStoreError(f"{path}: its alembic_version table is not one revision ({exc})") from None
    if current is None and set(inspect(conn).get_table_names()) - {"alembic_version"}:
        raise StateStoreError(f"{path} holds tables but no fleetlora state: not a state store")
    if current is not None and current not in known:
        raise StateStoreError(
            f"{path} is at schema revision {current}, which this fleetlora does not know "
            "(a newer fleetlora wrote it): upgrade fleetlora to read it"
        )
    return current


def migrate(engine: Engine, path: Path) -> str:
    """Bring the schema of ``engine``'s database to the newest revision; return that revision.

    Raises
    ------
    StateStoreError
        If the file is not SQLite, holds another application's tables, or a newer revision.
    """
    newest = head()
    try:
        with engine.begin() as conn:
            if _current(conn, path) != newest:
                cfg = _script()[0]
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except DatabaseError as exc:
        raise StateStoreError(f"{path} is not a SQLite state store: {exc.orig}") from None
    return newest


def check_revision(conn: Connection, path: Path) -> None:
    """Refuse, without writing anything, a store that is not at this fleetlora's newest revision.

    Raises
    ------
    StateStoreError
        If the file is not SQLite, another application's, empty (no schema yet), older or newer.
    """
    newest = head()
    try:
        current = _current(conn, path)
    except DatabaseError as exc:
        raise StateStoreError(f"{path} is not a SQLite state store: {exc.orig}") from None
    if current is None:
        raise StateStoreError(f"{path} holds no fleetlora state yet: the coordinator creates it when a run starts")
    if current != newest:
        raise StateStoreError(
            f"{path} is at schema revision {current}, older than this fleetlora's {newest}: the coordinator "
            f"upgrades it when it next opens it, or run `fleetlora dashboard --migrate --db {path}` once"
        )
