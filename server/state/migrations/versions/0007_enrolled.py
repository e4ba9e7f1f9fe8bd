"""Secure rounds keep how many of their survivors were enrolled devices (SecAgg+ against a malicious coordinator).

A device with an identity and an enrolment (``shared/enrolment.py``) signs its SecAgg+ keys; when
any device of a round did, the round ran the consistency stage (every survivor signs the survivor
list it was told of before any reveals). ``secure_enrolled`` is the number of survivors whose keys
an identity signed (the coordinator checked each signature; their neighbours checked the
enrolments). NULL for rounds recorded before 0007 and for rounds that did not run securely.

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
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("secure_enrolled")
