"""Initial schema: API keys, jobs, webhook deliveries.

Revision ID: 0001
Revises:
"""

from alembic import op

from fluxserve.jobs.tables import api_keys, jobs, webhook_deliveries

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    for table in (api_keys, jobs, webhook_deliveries):
        table.create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    for table in (webhook_deliveries, jobs, api_keys):
        table.drop(bind)
