"""Client results keep the client's self-reported name beside their key (the node id from now on).

Until 0002 a client result was keyed by the name the client reported, so a client reporting
another client's name overwrote that client's rows. From 0003 the key (``client``) is the Flower
node id and ``name`` is display text only; rows recorded before keep their key and get it as
their name.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``client_results.name`` (NOT NULL), filled with each existing row's ``client``."""
    op.add_column("client_results", sa.Column("name", sa.String()))
    op.execute("update client_results set name = client")
    with op.batch_alter_table("client_results") as batch:
        batch.alter_column("name", existing_type=sa.String(), nullable=False)


def downgrade() -> None:
    """Drop ``client_results.name`` (rows keep their keys)."""
    with op.batch_alter_table("client_results") as batch:
        batch.drop_column("name")
