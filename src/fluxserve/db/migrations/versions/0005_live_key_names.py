"""Key names are unique among live keys, so that ``credits add alice 1`` cannot reach a revoked "alice".

A partial unique index (SQLite and PostgreSQL both have them); a revoked key keeps its name. Live keys that
already share a name keep their oldest holder's name; the others get their prefix appended.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LIVE = sa.text("active")


def upgrade() -> None:
    keys = sa.table(
        "api_keys",
        sa.column("id", sa.String),
        sa.column("name", sa.String),
        sa.column("key_prefix", sa.String),
        sa.column("active", sa.Boolean),
        sa.column("created_at", sa.DateTime),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(keys.c.id, keys.c.name, keys.c.key_prefix)
        .where(keys.c.active.is_(True))
        .order_by(keys.c.created_at)
    ).all()
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            conn.execute(
                sa.update(keys).where(keys.c.id == row.id).values(name=f"{row.name}-{row.key_prefix}")
            )
        seen.add(row.name)
    op.create_index(
        "uq_api_keys_live_name",
        "api_keys",
        ["name"],
        unique=True,
        sqlite_where=LIVE,
        postgresql_where=LIVE,
    )


def downgrade() -> None:
    op.drop_index("uq_api_keys_live_name", "api_keys")
