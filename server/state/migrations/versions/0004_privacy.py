"""Rounds and runs keep their differential-privacy facts (issue 16): ε spent, δ, z, C, clipping, sampling.

A round that released its aggregate under client-level DP records the accountant's cumulative
ε after it (at δ), the noise multiplier z, the clip norm C, the fraction of updates clipped, the
sampling rate q, the expected number of clients m (the mean's fixed denominator) and where the
clipping ran (``server`` or ``client``). A run under DP records its δ, its ε limit, z, C, q, the
clipping side and the population q was computed for (known before its first round releases).
The columns are prefixed ``dp_``: in this code base a bare ``delta`` is an adapter update. Every
one is NULL for rows recorded before 0004 and for rounds and runs without DP.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

ROUND_FLOATS = (
    "dp_epsilon",
    "dp_delta",
    "dp_noise_multiplier",
    "dp_clip_norm",
    "dp_clipped_fraction",
    "dp_sampling_rate",
    "dp_expected_clients",
)

RUN_FLOATS = ("dp_delta", "dp_max_epsilon", "dp_noise_multiplier", "dp_clip_norm", "dp_sampling_rate")


def upgrade() -> None:
    """Add the nullable ``dp_*`` columns to ``rounds`` and ``runs`` (existing rows keep NULL: no DP)."""
    for name in ROUND_FLOATS:
        op.add_column("rounds", sa.Column(name, sa.Float()))
    op.add_column("rounds", sa.Column("dp_clipping", sa.String()))
    for name in RUN_FLOATS:
        op.add_column("runs", sa.Column(name, sa.Float()))
    op.add_column("runs", sa.Column("dp_clipping", sa.String()))
    op.add_column("runs", sa.Column("dp_population", sa.Integer()))


def downgrade() -> None:
    """Drop the ``dp_*`` columns (the rows stay, without their privacy facts)."""
    with op.batch_alter_table("rounds", recreate="never") as batch:  # in place: see 0007
        for name in (*ROUND_FLOATS, "dp_clipping"):
            batch.drop_column(name)
    with op.batch_alter_table("runs", recreate="never") as batch:
        for name in (*RUN_FLOATS, "dp_clipping", "dp_population"):
            batch.drop_column(name)
