"""The append-only credit ledger (each finite balance so far is its key's first entry, a ``set``), and
whether a job's result was deleted by ``fluxserve prune`` rather than by retention.

Revision ID: 0012
Revises: 0011
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ledger = op.create_table(
        "credit_ledger",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(36), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount_hundredths", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("operator", sa.String(255), nullable=True),
        sa.Column("jobs", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("jobs") as batch:  # whether `fluxserve prune` deleted the result
        batch.add_column(sa.Column("result_pruned", sa.Boolean(), nullable=True))
    op.create_index("ix_credit_ledger_key_time", "credit_ledger", ["key_id", "created_at"])
    op.create_index("ix_credit_ledger_job", "credit_ledger", ["job_id"])
    keys = sa.table("api_keys", sa.column("id", sa.String), sa.column("credits_hundredths", sa.BigInteger))
    balances = op.get_bind().execute(sa.select(keys).where(keys.c.credits_hundredths.is_not(None))).all()
    now = datetime.now(UTC)
    op.bulk_insert(
        ledger,
        [
            {"key_id": key_id, "kind": "set", "amount_hundredths": balance, "operator": "migration 0012",
             "created_at": now}
            for key_id, balance in balances
        ],
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_credit_ledger_job", "credit_ledger")
    op.drop_index("ix_credit_ledger_key_time", "credit_ledger")
    op.drop_table("credit_ledger")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result_pruned")
