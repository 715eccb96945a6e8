"""Counters for /metrics kept as jobs and webhook deliveries change, by database triggers.

``/metrics`` used to aggregate the whole jobs table at every scrape; rows are kept for billing, so that grew
without bound. Triggers keep three small tables in the same transaction as every change of a job or a
delivery, whatever code path makes it, on SQLite and PostgreSQL alike:

- ``job_counts``: jobs by (model, status). An active status (fetching, queued, running) is decremented when
  a job leaves it; an ended status only ever grows (a deleted row is not subtracted: Prometheus counters
  only grow, and rows are pruned for age, not undone).
- ``job_seconds``: histogram buckets by (model, kind, bucket): ``queue_wait`` observed at each claim
  (submission to that start) and ``run`` when a started job ends (start to end). Each observation counts in
  the one bucket whose bound it reaches first; the reader makes them cumulative.
- ``webhook_counts``: deliveries by status (pending decremented when it leaves, delivered and failed grow).

On PostgreSQL each row also has a ``shard`` (the backend's pid modulo 8), so that concurrent transactions
rarely update the same counter row (one row per (model, status) would serialise every claim of a model);
readers sum the shards. SQLite has one writer: shard 0.

The counters are filled once from the existing rows. On PostgreSQL creating the triggers locks the tables
against writes until the migration commits, so no change slips between the backfill and the triggers.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# Frozen here: the triggers' buckets (upper bounds in seconds). jobs/stats.py renders the same bounds; a
# change of them is a new migration that re-creates the triggers.
QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ACTIVE = "('fetching', 'queued', 'running')"
PENDING = "('pending')"
SHARDS = 8


def _bucket(seconds: str, bounds: tuple[float, ...]) -> str:
    """The bucket label (``le``) of ``seconds``: the first bound it does not exceed, else ``+Inf``."""
    whens = " ".join(f"WHEN {seconds} <= {bound!r} THEN '{bound:g}'" for bound in bounds)
    return f"CASE {whens} ELSE '+Inf' END"


def _seconds(later: str, earlier: str, postgres: bool) -> str:
    """``later - earlier`` in seconds (never below 0: clocks of two hosts may disagree a little)."""
    if postgres:
        return f"GREATEST(EXTRACT(EPOCH FROM ({later} - {earlier}))::float8, 0.0)"
    # julianday() is a float of days (~50 us apart today): rounded to the millisecond, 5.0 s stays 5.0 s
    return f"MAX(ROUND((julianday({later}) - julianday({earlier})) * 86400.0, 3), 0.0)"


def _count(table: str, keys: dict[str, str], value: str, delta: str, shard: str, where: str) -> str:
    """An upsert adding ``delta`` to the counter row of ``keys`` when ``where`` holds."""
    columns = ", ".join([*keys, "shard", value])
    values = ", ".join([*keys.values(), shard, delta])
    conflict = ", ".join([*keys, "shard"])
    return (
        f"INSERT INTO {table} ({columns}) SELECT {values} WHERE {where} "
        f"ON CONFLICT ({conflict}) DO UPDATE SET {value} = {table}.{value} + excluded.{value};"
    )


def _observe(row: str, kind: str, later: str, earlier: str, shard: str, where: str, postgres: bool) -> str:
    """An upsert of one observation (``later - earlier`` of ``row``) into its ``job_seconds`` bucket."""
    bounds = QUEUE_WAIT_BUCKETS if kind == "queue_wait" else RUN_BUCKETS
    seconds = _seconds(f"{row}.{later}", f"{row}.{earlier}", postgres)
    return (
        "INSERT INTO job_seconds (model, kind, le, shard, observations, seconds) "
        f"SELECT {row}.model, '{kind}', {_bucket('s', bounds)}, {shard}, 1, s "
        f"FROM (SELECT {seconds} AS s) AS observed WHERE {where} "
        "ON CONFLICT (model, kind, le, shard) DO UPDATE SET "
        "observations = job_seconds.observations + 1, seconds = job_seconds.seconds + excluded.seconds;"
    )


def _job_statements(op_name: str, shard: str, postgres: bool) -> list[str]:
    """What a change of one jobs row does to the counters (OLD and NEW as the trigger sees them)."""
    started = "{row}.started_at IS NOT NULL"
    ended = (
        "{row}.status NOT IN "
        + ACTIVE
        + " AND {row}.started_at IS NOT NULL AND {row}.finished_at IS NOT NULL"
    )
    job = {"model": "{row}.model", "status": "{row}.status"}

    def keys(row: str) -> dict[str, str]:
        return {name: value.format(row=row) for name, value in job.items()}

    if op_name == "INSERT":  # a row as it stands (also how the backfill counts)
        return [
            _count("job_counts", keys("NEW"), "jobs", "1", shard, "TRUE"),
            _observe(
                "NEW", "queue_wait", "started_at", "created_at", shard, started.format(row="NEW"), postgres
            ),
            _observe("NEW", "run", "finished_at", "started_at", shard, ended.format(row="NEW"), postgres),
        ]
    if op_name == "UPDATE":  # the status changed (the trigger's condition)
        return [
            *_moved(
                _count("job_counts", keys("OLD"), "jobs", "-1", shard, f"OLD.status IN {ACTIVE}"),
                _count("job_counts", keys("NEW"), "jobs", "1", shard, "TRUE"),
                postgres,
            ),
            _observe(
                "NEW",
                "queue_wait",
                "started_at",
                "created_at",
                shard,
                "NEW.status = 'running' AND NEW.started_at IS NOT NULL",
                postgres,
            ),
            _observe(
                "NEW",
                "run",
                "finished_at",
                "started_at",
                shard,
                f"OLD.status IN {ACTIVE} AND " + ended.format(row="NEW"),
                postgres,
            ),
        ]
    return [_count("job_counts", keys("OLD"), "jobs", "-1", shard, f"OLD.status IN {ACTIVE}")]


def _moved(leave: str, enter: str, postgres: bool) -> list[str]:
    """A status change: the old status's row and the new one's. On PostgreSQL they are updated (locked) in
    the order of their names, the same in every transaction, so that two transactions moving jobs between
    the same two statuses in opposite directions wait for each other rather than deadlock."""
    if not postgres:
        return [leave, enter]
    return [f"IF OLD.status < NEW.status THEN {leave} {enter} ELSE {enter} {leave} END IF;"]


def _delivery_statements(op_name: str, shard: str, postgres: bool) -> list[str]:
    grow = _count("webhook_counts", {"status": "NEW.status"}, "deliveries", "1", shard, "TRUE")
    shrink = _count(
        "webhook_counts", {"status": "OLD.status"}, "deliveries", "-1", shard, f"OLD.status IN {PENDING}"
    )
    return {"INSERT": [grow], "UPDATE": _moved(shrink, grow, postgres), "DELETE": [shrink]}[op_name]


TABLES = ("jobs", "webhook_deliveries")


def _statements(table: str, op_name: str, shard: str, postgres: bool) -> list[str]:
    if table == "jobs":
        return _job_statements(op_name, shard, postgres)
    return _delivery_statements(op_name, shard, postgres)


def _sqlite_triggers(table: str) -> None:
    for op_name in ("INSERT", "UPDATE", "DELETE"):
        event = "UPDATE OF status" if op_name == "UPDATE" else op_name
        when = " WHEN OLD.status IS NOT NEW.status" if op_name == "UPDATE" else ""
        body = "\n  ".join(_statements(table, op_name, "0", postgres=False))
        op.execute(
            f"CREATE TRIGGER {table}_counters_{op_name.lower()} AFTER {event} ON {table} FOR EACH ROW{when}\n"
            f"BEGIN\n  {body}\nEND"
        )


def _postgres_triggers(table: str) -> None:
    shard = f"(pg_backend_pid() % {SHARDS})"
    branches = "\n".join(
        f"  {'IF' if index == 0 else 'ELSIF'} TG_OP = '{op_name}' THEN\n    "
        + "\n    ".join(_statements(table, op_name, shard, postgres=True))
        for index, op_name in enumerate(("INSERT", "UPDATE", "DELETE"))
    )
    op.execute(
        f"CREATE FUNCTION {table}_counters() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n{branches}\n"
        "  END IF;\n  RETURN NULL;\nEND\n$$"
    )
    function = f"EXECUTE FUNCTION {table}_counters()"
    op.execute(f"CREATE TRIGGER {table}_counters_insert AFTER INSERT ON {table} FOR EACH ROW {function}")
    op.execute(
        f"CREATE TRIGGER {table}_counters_update AFTER UPDATE OF status ON {table} FOR EACH ROW "
        f"WHEN (OLD.status IS DISTINCT FROM NEW.status) {function}"
    )
    op.execute(f"CREATE TRIGGER {table}_counters_delete AFTER DELETE ON {table} FOR EACH ROW {function}")


def _backfill(postgres: bool) -> None:
    """The counters of the rows there are, counted as the INSERT trigger counts one row."""
    op.execute(
        "INSERT INTO job_counts (model, status, shard, jobs) SELECT model, status, 0, COUNT(*) FROM jobs "
        "GROUP BY model, status"
    )
    for kind, later, earlier, where, bounds in (
        ("queue_wait", "started_at", "created_at", "started_at IS NOT NULL", QUEUE_WAIT_BUCKETS),
        (
            "run",
            "finished_at",
            "started_at",
            f"status NOT IN {ACTIVE} AND started_at IS NOT NULL AND finished_at IS NOT NULL",
            RUN_BUCKETS,
        ),
    ):
        seconds = _seconds(later, earlier, postgres)
        op.execute(
            "INSERT INTO job_seconds (model, kind, le, shard, observations, seconds) "
            f"SELECT model, '{kind}', le, 0, COUNT(*), SUM(s) FROM "
            f"(SELECT model, s, {_bucket('s', bounds)} AS le FROM (SELECT model, {seconds} AS s FROM jobs "
            f"WHERE {where}) AS observed) AS bucketed GROUP BY model, le"
        )
    op.execute(
        "INSERT INTO webhook_counts (status, shard, deliveries) SELECT status, 0, COUNT(*) "
        "FROM webhook_deliveries GROUP BY status"
    )


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "job_counts",
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("shard", sa.SmallInteger, nullable=False),
        sa.Column("jobs", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("model", "status", "shard", name="pk_job_counts"),
    )
    op.create_table(
        "job_seconds",
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("le", sa.String(16), nullable=False),
        sa.Column("shard", sa.SmallInteger, nullable=False),
        sa.Column("observations", sa.BigInteger, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("model", "kind", "le", "shard", name="pk_job_seconds"),
    )
    op.create_table(
        "webhook_counts",
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("shard", sa.SmallInteger, nullable=False),
        sa.Column("deliveries", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("status", "shard", name="pk_webhook_counts"),
    )
    for table in TABLES:
        if postgres:
            _postgres_triggers(table)
        else:
            _sqlite_triggers(table)
    _backfill(postgres)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table in TABLES:
        for op_name in ("insert", "update", "delete"):
            op.execute(
                f"DROP TRIGGER IF EXISTS {table}_counters_{op_name}" + (f" ON {table}" if postgres else "")
            )
        if postgres:
            op.execute(f"DROP FUNCTION IF EXISTS {table}_counters()")
    for name in ("webhook_counts", "job_seconds", "job_counts"):
        op.drop_table(name)
