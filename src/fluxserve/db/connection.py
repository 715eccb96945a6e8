"""Opening the database (a SQLAlchemy ``Engine``, called ``database`` throughout: ``engine`` is the model
interface) and its schema migrations (Alembic), for SQLite and PostgreSQL alike."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.exc import DBAPIError

MIGRATIONS = Path(__file__).with_name("migrations")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def private_file(path: Path) -> None:
    """Make the SQLite file (it holds webhook secrets) readable by its owner only: created 0600 before
    SQLite opens it (SQLite gives its -wal and -shm files the database file's mode), an existing one and
    its -wal/-shm narrowed to 0600; a missing parent directory is created 0700."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        # PermissionError: not ours to change (a shared file the operator set up)
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if each.stat().st_mode & 0o077:
                each.chmod(0o600)


# Users write the URL libpq and psql take; SQLAlchemy needs the driver named. Here, and nowhere else.
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_POSTGRES_DRIVER = "postgresql+psycopg://"
# Any fixed 64-bit number: the transaction-scoped lock that lets one process at a time run migrations.
_MIGRATION_LOCK = 0x466C7578_53657276  # "FluxServ"


def database_url(url: str) -> str:
    """The SQLAlchemy URL for what a user configured: ``postgresql://`` and ``postgres://`` mean psycopg 3."""
    for scheme in _POSTGRES_SCHEMES:
        if url.startswith(scheme):
            return _POSTGRES_DRIVER + url[len(scheme) :]
    return url


@dataclass(frozen=True)
class Timeouts:
    """How long a PostgreSQL caller waits, so that a database that is away answers a request with a 503
    in seconds instead of holding it (and its pool slot) for minutes. Seconds; settings.py documents them."""

    pool: float = 5.0  # for a connection from a full pool
    connect: int = 5  # for a new connection to be established (libpq's connect_timeout, whole seconds)
    statement: float = 30.0  # for one statement (PostgreSQL's statement_timeout); 0: none


def open_database(url: str, timeouts: Timeouts = Timeouts()) -> Engine:
    """The database, tuned for concurrent workers: SQLite in WAL mode with a generous busy timeout; PostgreSQL
    (psycopg 3) with a recycled pool and bounded waits (:class:`Timeouts`)."""
    url = database_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:" and not path.startswith("file:"):
            private_file(Path(path))
        database = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(database, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return database
    # No pre-ping (a round trip on every checkout): a server restart or failover leaves dead connections in
    # the pool, which the first statement finds; the request paths retry once (:func:`reconnecting`).
    # recycle: idle timeouts of proxies (PgBouncer, cloud load balancers) kill old ones too. Each worker
    # thread and API request holds at most one connection at a time, so 10 + 20 overflow covers a
    # process; the server's max_connections must cover all processes.
    return create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        pool_recycle=1800,
        pool_timeout=timeouts.pool,
        connect_args={
            "application_name": "fluxserve",
            "connect_timeout": timeouts.connect,
            "options": f"-c statement_timeout={round(timeouts.statement * 1000)}",
        },
    )


P = ParamSpec("P")
R = TypeVar("R")


def reconnecting(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` (a read, or one transaction) again, once, when its pooled connection turned out to
    be dead (the server restarted, or killed the backend): SQLAlchemy then invalidates the whole pool, so
    the second try opens a fresh connection.

    Only an error raised by a statement is retried: its transaction was never committed. An error of the
    COMMIT itself (no statement) may follow a commit the server made, so it is raised, never repeated."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except DBAPIError as error:
            if not error.connection_invalidated or error.statement is None:
                raise
        return function(*args, **kwargs)

    return run


def migrate(database: Engine) -> None:
    """Bring the schema to the newest revision; safe to run on every start, from any number of processes
    at once (PostgreSQL: an advisory lock held by the migrating transaction; SQLite: its write lock)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with database.begin() as connection:
        if connection.dialect.name == "postgresql":
            # A migration may wait for another process's and rewrite big tables: no statement timeout.
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
