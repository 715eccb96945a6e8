"""The one module that chooses implementations from settings: the database, the job store, the blob store.

The API process (``app.py``) and a worker process (``worker/process.py``) both build their parts here, so
that swapping a backend touches no caller.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from sqlalchemy import Engine

from fluxserve.db.connection import Timeouts, make_engine, migrate
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.store_sql import SqlJobStore
from fluxserve.jobs.wakeup import Polling, PostgresNotify
from fluxserve.settings import Settings
from fluxserve.storage.base import BlobStore
from fluxserve.storage.local import LocalBlobStore
from fluxserve.storage.s3 import S3BlobStore


def make_blob_store(url: str) -> BlobStore:
    """``file:///path`` (the default: the data dir) or ``s3://bucket/prefix?endpoint=&region=&urls=``."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalBlobStore(Path(url2pathname(parts.path)))
    if parts.scheme == "s3":
        return S3BlobStore.from_url(url)
    raise ValueError(f"FLUXSERVE_STORAGE_URL: unsupported scheme {parts.scheme!r} (use file:// or s3://)")


def open_database(settings: Settings) -> Engine:
    """The database engine, its schema brought up to date (safe from any number of processes)."""
    timeouts = Timeouts(
        pool=settings.database_pool_timeout_seconds,
        connect=settings.database_connect_timeout_seconds,
        statement=settings.database_statement_timeout_seconds,
    )
    database = make_engine(settings.database, timeouts)
    migrate(database)
    return database


def make_job_store(database: Engine) -> JobStore:
    """The SQL store; on PostgreSQL idle workers are woken by LISTEN/NOTIFY, on SQLite they poll."""
    wakeups = PostgresNotify(database) if database.dialect.name == "postgresql" else Polling()
    return SqlJobStore(database, wakeups)
