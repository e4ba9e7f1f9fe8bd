"""Client results keep what heterogeneous fleets add (issue 19): staleness and a device's chosen settings.

Under ``aggregation.mode = async`` (FedBuff) an accepted update's ``staleness`` is the number of
releases signed since the one it trained on (``release_round``), and ``contributions`` the
device's accepted updates in the run so far. A device with a node config ``memory-budget-mb``
reports the budget and what it chose to fit it: ``micro_batch_size`` (0: the whole batch) and
``gradient_checkpointing`` (0 / 1); its rank is ``lora_rank`` (0005). Every new column is NULL
for rows recorded before 0006 and for what a device did not report.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

COLUMNS = (
    "staleness",
    "release_round",
    "contributions",
    "memory_budget_mb",
    "micro_batch_size",
    "gradient_checkpointing",
)


def upgrade() -> None:
    """Add the nullable columns to ``client_results`` (existing rows keep NULL: not reported)."""
    for name in COLUMNS:
        op.add_column("client_results", sa.Column(name, sa.Integer()))


def downgrade() -> None:
    """Drop them (the client rows stay, without staleness or settings)."""
    with op.batch_alter_table("client_results") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
