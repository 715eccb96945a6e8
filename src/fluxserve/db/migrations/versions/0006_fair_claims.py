"""Fair claims: each job has a turn, given at submit, and workers claim the lowest turn first (oldest first
among equals), so that one key's long queue cannot starve another key's few jobs (jobs/store_sql.py).

Jobs already in the table get turn 0: the queue they form is served oldest first, as before.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("turn", sa.BigInteger, nullable=False, server_default="0"))
        batch.create_index("ix_jobs_queue", ["status", "turn", "created_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_queue")
        batch.drop_column("turn")
