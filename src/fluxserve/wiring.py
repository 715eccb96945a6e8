"""The one module that chooses implementations from settings: the database, the change feed, the job
store, the blob store.

The API process (``app.py``) and a worker process (``worker/process.py``) both build their parts here, so
that swapping a backend touches no caller.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from sqlalchemy import Engine

from fluxserve.db.connection import Timeouts, make_engine, migrate
from fluxserve.jobs.feed import ChangeFeed, PostgresFeed, SqliteFeed
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.store_sql import SqlJobStore
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


def _timeouts(settings: Settings) -> Timeouts:
    return Timeouts(
        pool=settings.database_pool_timeout_seconds,
        connect=settings.database_connect_timeout_seconds,
        statement=settings.database_statement_timeout_seconds,
    )


def open_database(settings: Settings) -> Engine:
    """The database engine, its schema brought up to date (safe from any number of processes)."""
    database = make_engine(settings.database, _timeouts(settings))
    migrate(database)
    return database


def open_ops_database(settings: Settings) -> Engine:
    """A second engine on the same database, for /readyz and the /metrics refresh: its own pool, so that
    they never queue behind requests for a connection (they use at most one each at a time)."""
    return make_engine(settings.database, _timeouts(settings))


def make_feed(database: Engine) -> ChangeFeed:
    """The process's change feed: LISTEN/NOTIFY on PostgreSQL, a ``data_version`` probe on SQLite."""
    return PostgresFeed(database) if database.dialect.name == "postgresql" else SqliteFeed(database)


def make_job_store(database: Engine, feed: ChangeFeed | None = None) -> JobStore:
    """The SQL store, its idle workers woken by ``feed`` (the process's one; a new one when not given)."""
    return SqlJobStore(database, feed or make_feed(database))
