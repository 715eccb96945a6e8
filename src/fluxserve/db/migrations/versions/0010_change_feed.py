"""The change feed (jobs/feed.py): triggers announce every change of a job's status, progress or attempts,
and every change of an API key, so that no code path can forget to.

- PostgreSQL: ``NOTIFY fluxserve_changes`` from the changing transaction (delivered at its commit, never
  for a rollback), payload ``j <job id> <status> <1 if it has a webhook>`` or ``k <key id>``.
- SQLite: ``change_seq`` set to the table's highest plus one (SQLite's single writer makes that safe), so
  that one probe per process reads only the rows changed since its last look. NULL on PostgreSQL.

A heartbeat that moves nothing but ``heartbeat_at`` announces nothing.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# What a client, a worker or the webhook dispatcher can see change; IS DISTINCT FROM / IS NOT compare NULLs.
_JOB_FIELDS = ("status", "progress", "attempts")
_KEY_FIELDS = ("active", "credits_hundredths", "key_hash", "webhook_secret", "name")

_PG_FUNCTIONS = """
CREATE FUNCTION fluxserve_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('fluxserve_changes',
    'j ' || NEW.id || ' ' || NEW.status || ' ' || (NEW.webhook_url IS NOT NULL)::int);
  RETURN NULL;
END $$;
CREATE FUNCTION fluxserve_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('fluxserve_changes', 'k ' || NEW.id);
  RETURN NULL;
END $$;
"""


def _moved(fields: tuple[str, ...], differ: str) -> str:
    return " OR ".join(f"OLD.{name} {differ} NEW.{name}" for name in fields)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("change_seq", sa.BigInteger, nullable=True))
    op.add_column("api_keys", sa.Column("change_seq", sa.BigInteger, nullable=True))
    op.create_index("ix_jobs_change_seq", "jobs", ["change_seq"])
    op.create_index("ix_api_keys_change_seq", "api_keys", ["change_seq"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTIONS)
        op.execute(
            "CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs "
            "FOR EACH ROW EXECUTE FUNCTION fluxserve_job_changed()"
        )
        op.execute(
            "CREATE TRIGGER jobs_changed AFTER UPDATE ON jobs FOR EACH ROW "
            f"WHEN ({_moved(_JOB_FIELDS, 'IS DISTINCT FROM')}) EXECUTE FUNCTION fluxserve_job_changed()"
        )
        op.execute(
            "CREATE TRIGGER api_keys_changed AFTER UPDATE ON api_keys FOR EACH ROW "
            f"WHEN ({_moved(_KEY_FIELDS, 'IS DISTINCT FROM')}) EXECUTE FUNCTION fluxserve_key_changed()"
        )
        return
    for table, fields in (("jobs", _JOB_FIELDS), ("api_keys", _KEY_FIELDS)):
        bump = (
            f"UPDATE {table} SET change_seq = (SELECT coalesce(max(change_seq), 0) + 1 FROM {table}) "
            "WHERE id = NEW.id;"
        )
        op.execute(f"CREATE TRIGGER {table}_inserted AFTER INSERT ON {table} BEGIN {bump} END")
        op.execute(
            f"CREATE TRIGGER {table}_changed AFTER UPDATE ON {table} "
            f"WHEN {_moved(fields, 'IS NOT')} BEGIN {bump} END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER api_keys_changed ON api_keys")
        op.execute("DROP TRIGGER jobs_changed ON jobs")
        op.execute("DROP TRIGGER jobs_inserted ON jobs")
        op.execute("DROP FUNCTION fluxserve_key_changed()")
        op.execute("DROP FUNCTION fluxserve_job_changed()")
    else:
        for table in ("jobs", "api_keys"):
            op.execute(f"DROP TRIGGER {table}_changed")
            op.execute(f"DROP TRIGGER {table}_inserted")
    for table in ("api_keys", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_change_seq")
            batch.drop_column("change_seq")
