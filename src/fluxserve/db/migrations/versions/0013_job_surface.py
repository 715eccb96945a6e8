"""Jobs remember their surface: ``jobs.dialect`` becomes ``jobs.surface``.

Existing rows keep their value (``reseller`` or ``vendor``). Until this release, jobs made through the
reseller's own format (``/flux/generate``, ``/flux/edits``) and the OpenAI images API were stored as
``reseller``: those made before the upgrade read as reseller jobs (the same fetch JSON and webhook as before);
from now on they are stored as ``reseller-native`` and ``openai``.

A rename in place (``ALTER TABLE ... RENAME COLUMN``, SQLite 3.25+ and PostgreSQL): the table is not copied,
so its triggers (0010, 0011) and indexes stay as they are. Processes of the release before name
``dialect`` in their statements: they cannot run against the schema after this one (stop them, migrate,
start the new release; the rows stay where they were).

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE jobs RENAME COLUMN dialect TO surface")


def downgrade() -> None:
    # The surfaces the old code does not know read as the reseller's, as they did before.
    op.execute("UPDATE jobs SET surface = 'reseller' WHERE surface NOT IN ('reseller', 'vendor')")
    op.execute("ALTER TABLE jobs RENAME COLUMN surface TO dialect")
