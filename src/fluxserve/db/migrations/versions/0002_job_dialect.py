"""Jobs remember the dialect they came in, which renders their results and webhooks.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dialect", sa.String(16), nullable=False, server_default="reseller"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dialect")
