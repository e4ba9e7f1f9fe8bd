"""The coordinator's state store (SQLite + Alembic migrations); see ``server/state/store.py``."""

from server.state.store import SignedRound, StateStore, StateStoreError

__all__ = ["SignedRound", "StateStore", "StateStoreError"]
