"""Replicate predictions: the ``predictions`` table (one row per request, its webhook and how many of its
jobs ended), and ``jobs.prediction_id``, the prediction a job makes one output of. Existing jobs keep their
rows as they are (no prediction).

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("key_id", sa.String(36), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("outputs", sa.Integer(), nullable=False),
        sa.Column("ended", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("webhook", sa.Text(), nullable=True),
        sa.Column("webhook_events", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_predictions_key_created", "predictions", ["key_id", "created_at"])
    # A plain ADD COLUMN (not a batch copy of the table): the change feed's and counters' triggers on jobs
    # stay as they are.
    op.add_column("jobs", sa.Column("prediction_id", sa.String(36), nullable=True))
    op.create_index("ix_jobs_prediction", "jobs", ["prediction_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_prediction", "jobs")
    op.drop_column("jobs", "prediction_id")  # SQLite 3.35+ drops it in place, keeping the triggers
    op.drop_index("ix_predictions_key_created", "predictions")
    op.drop_table("predictions")
