"""Alembic environment: migrate the connection :class:`server.state.StateStore` hands over.

The store runs migrations itself (``command.upgrade`` with ``config.attributes["connection"]``);
there is no ``alembic.ini``. To add a revision, write the next file in ``versions/`` by hand
(``down_revision`` = the current head) and update ``server/state/schema.py`` to match; a test
checks that the migrated schema equals the tables in ``schema.py``.
"""

from __future__ import annotations

from alembic import context

from server.state.schema import metadata


def run_migrations_online() -> None:
    """Run the pending migrations on the connection the store passed in."""
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
