"""Alembic migrations of the state store, applied by :class:`server.state.StateStore` on open."""
