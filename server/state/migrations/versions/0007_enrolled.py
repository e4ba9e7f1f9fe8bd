"""Secure rounds keep how many of their survivors were enrolled devices (SecAgg+ against a malicious coordinator).

A device with an identity and an enrolment (``shared/enrolment.py``) signs its SecAgg+ keys; when
any device of a round did, the round ran the consistency stage (every survivor signs the survivor
list it was told of before any reveals). ``secure_enrolled`` is the number of survivors that
announced an enrolled identity, as the coordinator sees it (the enrolment signed by the authority
it names, the keys by the identity); whether that authority counts is each device's trust list.
NULL for rounds recorded before 0007 and for rounds that did not run securely.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the nullable ``secure_enrolled`` column to ``rounds`` (existing rows keep NULL: not recorded)."""
    op.add_column("rounds", sa.Column("secure_enrolled", sa.Integer()))


def downgrade() -> None:
    """Drop it (the rounds stay, with their other secure-aggregation facts)."""
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): a batch that recreated ``rounds`` would drop the old table, and
    # with foreign keys on (the store's engine turns them on) every client row of every round with it
    with op.batch_alter_table("rounds", recreate="never") as batch:
        batch.drop_column("secure_enrolled")
