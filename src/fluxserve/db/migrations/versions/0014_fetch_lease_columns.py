"""The fetch stage's lease in columns of its own (``fetch_owner``, ``fetch_renewed_at``): ``worker_id`` and
``heartbeat_at`` then mean only the worker running a job. A job fetching at the upgrade keeps its lease.

Revision ID: 0014
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_jobs = sa.table(
    "jobs",
    sa.column("status", sa.String),
    sa.column("worker_id", sa.String),
    sa.column("heartbeat_at", sa.DateTime(timezone=True)),
    sa.column("fetch_owner", sa.String),
    sa.column("fetch_renewed_at", sa.DateTime(timezone=True)),
)
_FETCHING = _jobs.c.status == "fetching"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("fetch_owner", sa.String(100), nullable=True))
    op.add_column("jobs", sa.Column("fetch_renewed_at", sa.DateTime(timezone=True), nullable=True))
    # Neither column is one the change-feed triggers watch (status, progress, attempts): nothing announced.
    op.execute(
        sa.update(_jobs)
        .where(_FETCHING)
        .values(
            fetch_owner=_jobs.c.worker_id,
            fetch_renewed_at=_jobs.c.heartbeat_at,
            worker_id=None,
            heartbeat_at=None,
        )
    )


def downgrade() -> None:
    op.execute(
        sa.update(_jobs)
        .where(_FETCHING)
        .values(worker_id=_jobs.c.fetch_owner, heartbeat_at=_jobs.c.fetch_renewed_at)
    )
    # A plain DROP COLUMN (SQLite 3.35+): a batch copy of the table would drop its triggers (0010, 0011).
    op.drop_column("jobs", "fetch_renewed_at")
    op.drop_column("jobs", "fetch_owner")
