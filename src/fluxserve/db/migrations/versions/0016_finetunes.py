"""The finetunes table: LoRA adapters added by the operator, each for every key or for one.

Revision ID: 0016
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "finetunes",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("key_id", sa.String(36), sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("blob_key", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_finetunes_key", "finetunes", ["key_id"])


def downgrade() -> None:
    op.drop_index("ix_finetunes_key", table_name="finetunes")
    op.drop_table("finetunes")
