"""The one module that chooses implementations from settings: the database, the change feed, the job
store's roles, the blob store.

The API process (``app.py``) and a worker process (``worker/process.py``) both build their parts here, so
that swapping a backend touches no caller.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from sqlalchemy import Engine

from fluxserve.db.connection import Timeouts, migrate, open_database
from fluxserve.jobs.feed import ChangeFeed, PostgresFeed, SqliteFeed
from fluxserve.jobs.store import Stores
from fluxserve.jobs.store_sql import SqlClaims, SqlExpiry, SqlFetchLeases, SqlJobReads, SqlSubmissions
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


def database_for(settings: Settings) -> Engine:
    """The database, its schema brought up to date (safe from any number of processes)."""
    database = open_database(settings.database, _timeouts(settings))
    migrate(database)
    return database


def ops_database_for(settings: Settings) -> Engine:
    """A second handle on the same database, for /readyz and the /metrics refresh: its own pool, so that
    they never queue behind requests for a connection (they use at most one each at a time)."""
    return open_database(settings.database, _timeouts(settings))


def make_feed(database: Engine) -> ChangeFeed:
    """The process's change feed: LISTEN/NOTIFY on PostgreSQL, a ``data_version`` probe on SQLite."""
    return PostgresFeed(database) if database.dialect.name == "postgresql" else SqliteFeed(database)


def make_stores(database: Engine, feed: ChangeFeed | None = None) -> Stores:
    """Each role of the job store on ``database``, built once; ``feed`` (the process's one) wakes idle
    workers when a job is queued (without one they poll)."""
    return Stores(
        reads=SqlJobReads(database),
        submissions=SqlSubmissions(database),
        claims=SqlClaims(database, feed),
        fetches=SqlFetchLeases(database),
        expiry=SqlExpiry(database),
    )
