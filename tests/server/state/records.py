"""What the state-store tests share: a run record, a signed-release note, DP and SecAgg facts, raw SQLite access."""

import sqlite3

from alembic import command
from alembic.config import Config
from hypothesis import strategies as st
from sqlalchemy import create_engine, event

from server.state import StateStore
from server.state.revision import MIGRATIONS

RUN = {"run_id": "demo-7", "model": "m", "method": "ties", "rounds": 2, "config": {"run-name": "demo"}}

# values a damaged or hostile file can hold in a column, whatever the column's declared type
HOSTILE = [float("inf"), float("-inf"), "2.5", "", b"\xff\x00", 2**63 - 1, -(2**63), 1e308, -1.0, "x" * 10_000]

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=50),
)
"""Any value a parser of the store may be handed."""

SECURE = {"survivors": 4, "recovered": 1, "dropped": 1, "enrolled": 3, "shares": 5, "threshold": 3, "clip_range": 0.05}
"""The round log's ``secure`` of a SecAgg+ round as ``server/secure_rounds.py`` notes it (one device dropped)."""

RUN_PRIVACY = {
    "delta": 1e-5,
    "max_epsilon": 8.0,
    "noise_multiplier": 1.1,
    "clip_norm": 1.0,
    "sampling_rate": 0.05,
    "clipping": "server",
    "population": 400,
}
"""The round log run's ``privacy`` as ``server/server_app.py`` notes it (there ``max_epsilon`` is None for no limit)."""


def privacy(n, **values):
    """The round log's ``privacy`` of round ``n`` of a DP run (the lead's interface): ε grows with the rounds."""
    return {
        "epsilon": 0.5 * n,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "clip_norm": 1.0,
        "clipped_fraction": 0.25,
        "sampling_rate": 0.05,
        "expected_clients": 20.0,
        "clipping": "server",
        **values,
    }


def release(n):
    """The round log's note of round ``n``'s signed release."""
    return {"key_id": "0123456789abcdef", "manifest": f"{n:064x}", "created": "2026-11-24T10:00:00Z", "path": f"/r/{n}"}


def rows(path, sql, params=()):
    """Run ``sql`` on the file directly (not through the store) and return every row."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


def execute(path, sql, params=()):
    """Write to the file directly, as anything that can write it could."""
    with sqlite3.connect(path) as conn:
        conn.execute(sql, params)


def alembic(db, step, revision, foreign_keys=False):
    """Run the project's migrations on the file: ``step`` is ``command.upgrade`` or ``command.downgrade``.

    ``foreign_keys``: with SQLite's foreign keys on, as the store's own engine has them.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(f"sqlite:///{db}")
    if foreign_keys:
        event.listen(engine, "connect", lambda conn, _: conn.execute("pragma foreign_keys = on"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        step(cfg, revision)
    engine.dispose()


def store_at_revision(tmp_path, revision):
    """A store holding one run, then migrated down to ``revision`` (as an older fleetlora left it)."""
    db = tmp_path / "state.sqlite"
    store = StateStore(db)
    store.save_run({**RUN, "started": 1.0})
    store.close()
    alembic(db, command.downgrade, revision)
    return db


def report(log, server_round, key, **values):
    """Record a client entry as the coordinator does: ``key`` is the node id (text), ``values`` may hold ``name``."""
    node_id = values.pop("node_id", int(key))
    log.client(server_round, node_id, values.pop("name", None), **values)
