"""The vendor dialect's per-task webhook_secret, and the megapixels a FLUX.2 job was charged for.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_secret", sa.Text(), nullable=True))
        batch.add_column(sa.Column("input_mp", sa.Float(), nullable=True))
        batch.add_column(sa.Column("output_mp", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("output_mp")
        batch.drop_column("input_mp")
        batch.drop_column("webhook_secret")
