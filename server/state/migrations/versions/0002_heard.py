"""Runs record when the coordinator was last heard from (its heartbeat), so a stopped run shows as stopped.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``runs.heard`` (Unix seconds; NULL for runs recorded before it existed)."""
    op.add_column("runs", sa.Column("heard", sa.Float()))


def downgrade() -> None:
    """Drop ``runs.heard``."""
    with op.batch_alter_table("runs", recreate="never") as batch:  # in place: see 0007
        batch.drop_column("heard")
