"""URL inputs are fetched before a job is queued: jobs waiting for a worker with a URL input go back to the
fetch stage (status ``fetching``), since workers no longer download anything.

Revision ID: 0007
Revises: 0006
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_jobs = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("status", sa.String),
    sa.column("params", sa.JSON),
    sa.column("worker_id", sa.String),
)


def _has_url(params: dict[str, Any]) -> bool:
    refs = [
        image.get("ref") if isinstance(image, dict) else image for image in params.get("input_images") or []
    ]
    refs.append(params.get("image_prompt"))
    return any(
        isinstance(ref, str) and ref.strip().lower().startswith(("http://", "https://")) for ref in refs
    )


def upgrade() -> None:
    conn = op.get_bind()
    waiting = conn.execute(
        sa.select(_jobs.c.id, _jobs.c.params).where(_jobs.c.status.in_(["queued", "running"]))
    ).all()
    for job_id, params in waiting:
        if isinstance(params, dict) and _has_url(params):
            conn.execute(
                sa.update(_jobs).where(_jobs.c.id == job_id).values(status="fetching", worker_id=None)
            )


def downgrade() -> None:
    op.execute(sa.update(_jobs).where(_jobs.c.status == "fetching").values(status="queued", worker_id=None))
