"""Retention: a job's result file is deleted after FLUXSERVE_RESULT_TTL_SECONDS; the row records when.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result_expired_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_jobs_result_expiry", ["result_expired_at", "finished_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_result_expiry")
        batch.drop_column("result_expired_at")
