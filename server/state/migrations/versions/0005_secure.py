"""Rounds keep their secure-aggregation facts (issue 17), clients the LoRA rank they trained at (issue 19).

A round aggregated with SecAgg+ (``aggregation.secure``) records how many devices' masked vectors
are in its sum (survivors), how many dropped after sharing their keys and had their masks removed
through the survivors' shares (recovered), how many fell out of the protocol in all (dropped),
and the parameters it ran with: the share count, the reconstruction threshold and the clipping
range of the quantization. Every ``secure_*`` column is NULL for rounds recorded before 0005 and
for rounds that did not run securely. A client result's ``lora_rank`` is the rank a device trained
at when it was below the run's ``lora.rank`` (NULL: the run's rank).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

INTEGERS = ("secure_survivors", "secure_recovered", "secure_dropped", "secure_shares", "secure_threshold")


def upgrade() -> None:
    """Add the nullable ``secure_*`` columns to ``rounds`` (existing rows keep NULL: not secure)."""
    for name in INTEGERS:
        op.add_column("rounds", sa.Column(name, sa.Integer()))
    op.add_column("rounds", sa.Column("secure_clip_range", sa.Float()))
    op.add_column("client_results", sa.Column("lora_rank", sa.Integer()))


def downgrade() -> None:
    """Drop the ``secure_*`` columns (the rounds stay, without their secure-aggregation facts)."""
    with op.batch_alter_table("rounds", recreate="never") as batch:  # in place: see 0007
        for name in (*INTEGERS, "secure_clip_range"):
            batch.drop_column(name)
    with op.batch_alter_table("client_results") as batch:
        batch.drop_column("lora_rank")
