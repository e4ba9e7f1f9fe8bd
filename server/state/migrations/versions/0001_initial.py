"""Initial schema: runs, rounds, client results.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create the three tables."""
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(), primary_key=True),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("model", sa.String()),
        sa.Column("method", sa.String()),
        sa.Column("base_digest", sa.String()),
        sa.Column("base_format", sa.String()),
        sa.Column("num_rounds", sa.Integer()),
        sa.Column("min_clients", sa.Integer()),
        sa.Column("releases", sa.String()),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("started", sa.Float(), nullable=False),
        sa.Column("finished", sa.Float()),
        sa.Column("wall_seconds", sa.Float()),
        sa.Column("adapter", sa.String()),
    )
    op.create_table(
        "rounds",
        sa.Column("run_id", sa.String(), primary_key=True),
        sa.Column("round", sa.Integer(), primary_key=True),
        sa.Column("method", sa.String()),
        sa.Column("started", sa.Float(), nullable=False),
        sa.Column("closed", sa.Float()),
        sa.Column("seconds", sa.Float()),
        sa.Column("mean_train_loss", sa.Float()),
        sa.Column("mean_heldout_loss", sa.Float()),
        sa.Column("bytes_up", sa.BigInteger()),
        sa.Column("bytes_down", sa.BigInteger()),
        sa.Column("manifest_digest", sa.String()),
        sa.Column("key_id", sa.String()),
        sa.Column("signed_at", sa.String()),
        sa.Column("release_path", sa.String()),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], ondelete="CASCADE"),
    )
    op.create_table(
        "client_results",
        sa.Column("run_id", sa.String(), primary_key=True),
        sa.Column("round", sa.Integer(), primary_key=True),
        sa.Column("client", sa.String(), primary_key=True),
        sa.Column("node_id", sa.String()),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("num_examples", sa.Integer()),
        sa.Column("train_loss", sa.Float()),
        sa.Column("heldout_loss", sa.Float()),
        sa.Column("train_seconds", sa.Float()),
        sa.Column("update_norm", sa.Float()),
        sa.Column("bytes_up", sa.BigInteger()),
        sa.Column("bytes_down", sa.BigInteger()),
        sa.Column("base_download_bytes", sa.BigInteger()),
        sa.ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"], ondelete="CASCADE"),
    )


def downgrade() -> None:
    """Drop the three tables."""
    op.drop_table("client_results")
    op.drop_table("rounds")
    op.drop_table("runs")
