"""Database tables, shared by the SQLite (embedded) and PostgreSQL (scale-out) deployments.

Credits are stored as integer hundredths of a credit so that 2.5-credit models add up exactly.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_prefix", String(16), nullable=False),
    Column("webhook_secret", String(100), nullable=False),
    Column("credits_hundredths", BigInteger, nullable=True),  # NULL: unlimited
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # SQLite's change order, written by triggers (jobs/feed.py; NULL on PostgreSQL, which NOTIFYs). 0010
    Column("change_seq", BigInteger, nullable=True),
    Index("ix_api_keys_change_seq", "change_seq"),
    # a name names one live key (a revoked key keeps its name); migration 0005
    Index(
        "uq_api_keys_live_name",
        "name",
        unique=True,
        sqlite_where=text("active"),
        postgresql_where=text("active"),
    ),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("key_id", String(36), ForeignKey("api_keys.id"), nullable=False),
    Column("model", String(64), nullable=False),
    Column("surface", String(16), nullable=False, server_default="reseller"),  # 0013; "dialect" before
    Column("status", String(32), nullable=False),
    Column("params", JSON, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("output_format", String(8), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("cost_hundredths", BigInteger, nullable=False),
    Column("webhook_url", Text, nullable=True),
    Column("webhook_secret", Text, nullable=True),  # the task's own webhook secret (vendor dialect); 0009
    Column("input_mp", Float, nullable=True),  # megapixels charged for, megapixel-priced models; 0009
    Column("output_mp", Float, nullable=True),
    Column("progress", Float, nullable=False, default=0.0),
    Column("result_key", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("details", JSON, nullable=False, default=dict),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker_id", String(100), nullable=True),  # the worker that claimed it (claims only write it)
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("heartbeat_at", DateTime(timezone=True), nullable=True),  # that worker's last heartbeat
    # The fetch stage's lease on a job waiting for its URL inputs (fetching jobs only; migration 0014).
    Column("fetch_owner", String(100), nullable=True),
    Column("fetch_renewed_at", DateTime(timezone=True), nullable=True),
    Column("result_expired_at", DateTime(timezone=True), nullable=True),  # retention deleted the result
    Column("result_pruned", Boolean, nullable=True),  # true: `fluxserve prune` deleted it (migration 0012)
    # The job's place in the fair order (jobs/store_sql.py, _turn): claims take the lowest turn first. 0006
    Column("turn", BigInteger, nullable=False, server_default="0"),
    # SQLite's change order, written by triggers (jobs/feed.py; NULL on PostgreSQL, which NOTIFYs). 0010
    Column("change_seq", BigInteger, nullable=True),
    Index("ix_jobs_change_seq", "change_seq"),
    Index("ix_jobs_status_created", "status", "created_at"),
    Index("ix_jobs_key_status", "key_id", "status"),
    Index("ix_jobs_result_expiry", "result_expired_at", "finished_at"),
    Index("ix_jobs_queue", "status", "turn", "created_at"),  # the claim's order, one index probe
    # The Replicate prediction the job makes one output of (db/predictions.py); migration 0015
    Column("prediction_id", String(36), nullable=True),
    Index("ix_jobs_prediction", "prediction_id"),
)

# A Replicate prediction (api/replicate.py): ``outputs`` jobs (its ``num_outputs``) made by one request, with
# the webhook the prediction (not each job) was given. ``ended`` counts its jobs that ended, so that the
# finish of the last one writes the ``completed`` webhook; ``started_at`` is set by the first claim of one,
# which writes the ``start`` webhook. Migration 0015.
predictions = Table(
    "predictions",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("key_id", String(36), ForeignKey("api_keys.id"), nullable=False),
    Column("model", String(64), nullable=False),  # the model table's name
    Column("input", JSON, nullable=False),  # as the client sent it (images replaced by their references)
    Column("outputs", Integer, nullable=False),
    Column("ended", Integer, nullable=False, default=0),
    Column("webhook", Text, nullable=True),
    Column("webhook_events", String(64), nullable=True),  # comma-separated start,output,logs,completed
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Index("ix_predictions_key_created", "key_id", "created_at"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("job_id", String(36), ForeignKey("jobs.id"), nullable=False),
    Column("key_id", String(36), ForeignKey("api_keys.id"), nullable=False),
    Column("url", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending, delivered, failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
)

# A client's Idempotency-Key: a repeat of the same request within 24 hours returns the job it made. The
# primary key is the unique (key_id, idempotency_key) that two concurrent repeats cannot both insert.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key_id", String(36), ForeignKey("api_keys.id"), nullable=False),
    Column("idempotency_key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("job_id", String(36), ForeignKey("jobs.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("key_id", "idempotency_key", name="pk_idempotency_keys"),
)

# One row per live worker process, wherever it runs, refreshed every few seconds (jobs/workers.py); read by
# /readyz and /metrics. Migration 0008.
workers = Table(
    "workers",
    metadata,
    Column("id", String(255), primary_key=True),  # <host>-<pid>
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("threads", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False),
    Index("ix_workers_seen", "seen_at"),
)

# Counters for /metrics, kept by triggers in the same transaction as each change of a job or a webhook
# delivery (migration 0011, which says what each counts); readers sum the shards. jobs/stats.py reads them.
job_counts = Table(
    "job_counts",
    metadata,
    Column("model", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("shard", SmallInteger, nullable=False),
    Column("jobs", BigInteger, nullable=False),
    PrimaryKeyConstraint("model", "status", "shard", name="pk_job_counts"),
)

job_seconds = Table(
    "job_seconds",
    metadata,
    Column("model", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # queue_wait, run
    Column("le", String(16), nullable=False),  # the bucket's upper bound, as Prometheus writes it
    Column("shard", SmallInteger, nullable=False),
    Column("observations", BigInteger, nullable=False),  # in this bucket only (not cumulative)
    Column("seconds", Float, nullable=False),
    PrimaryKeyConstraint("model", "kind", "le", "shard", name="pk_job_seconds"),
)

webhook_counts = Table(
    "webhook_counts",
    metadata,
    Column("status", String(16), nullable=False),
    Column("shard", SmallInteger, nullable=False),
    Column("deliveries", BigInteger, nullable=False),
    PrimaryKeyConstraint("status", "shard", name="pk_webhook_counts"),
)

# Every change to a key's credits, appended and never updated (db/ledger.py): for a key with a finite
# balance the entries add up to it. ``amount_hundredths`` is signed (a hold is negative, a refund positive);
# ``job_id`` and ``model`` name the job an entry is for (no foreign key: ``fluxserve prune
# --rows-older-than`` deletes old job rows and folds their entries into one ``summary`` entry per key, model
# and day), ``operator`` who changed credits by hand. Migration 0012.
credit_ledger = Table(
    "credit_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(36), ForeignKey("api_keys.id"), nullable=False),
    Column("kind", String(16), nullable=False),  # hold settle refund topup set take summary
    Column("amount_hundredths", BigInteger, nullable=False),
    Column("job_id", String(36), nullable=True),
    Column("model", String(64), nullable=True),
    Column("operator", String(255), nullable=True),
    Column("jobs", Integer, nullable=True),  # a summary: how many jobs' entries it folded
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_credit_ledger_key_time", "key_id", "created_at"),
    Index("ix_credit_ledger_job", "job_id"),
)

# Finetunes: LoRA adapters an operator added (``fluxserve finetunes add``), by name, which is the
# ``finetune_id`` clients send. ``key_id`` NULL: every key may use it; else only that key. ``model`` is the
# model name it was added for (core.models.FINETUNE_TARGETS), ``blob_key`` where its file is in the blob
# store (``finetunes/<sha256>.safetensors``). Migration 0016.
finetunes = Table(
    "finetunes",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("key_id", String(36), ForeignKey("api_keys.id"), nullable=True),
    Column("model", String(64), nullable=False),
    Column("blob_key", String(255), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("comment", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_finetunes_key", "key_id"),
)
