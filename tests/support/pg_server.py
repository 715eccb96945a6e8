"""A throwaway PostgreSQL cluster for the test session, and the ``database_url`` fixture that runs a test on
SQLite and on PostgreSQL.

The cluster lives in its own temporary directory with its own loopback port and unix socket, so that two
pytest-xdist workers each start one without meeting. It runs as the ``postgres`` user when the tests run as
root (PostgreSQL refuses root). Each test gets a fresh database copied from a migrated template, dropped
after it. Without Debian's binaries (``apt-get install postgresql``) the PostgreSQL cases are skipped, unless
``FLUXSERVE_REQUIRE_POSTGRES=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from fluxserve.db.connection import migrate, open_database
from tests.conftest import free_port

TEMPLATE = "fluxserve_template"
_SUPERUSER = "postgres"


DEBIAN = Path("/usr/lib/postgresql")  # Debian keeps each version apart: 15/bin, 16/bin, ...


def binaries(root: Path = DEBIAN) -> Path | None:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(root.glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def required_binaries(root: Path = DEBIAN) -> Path:
    """The bin directory; without one the test is skipped, or fails when FLUXSERVE_REQUIRE_POSTGRES=1."""
    bin_dir = binaries(root)
    if bin_dir is None:
        reason = f"PostgreSQL binaries not found under {root} (apt-get install postgresql)"
        if os.environ.get("FLUXSERVE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"FLUXSERVE_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    return bin_dir


class PostgresCluster:
    """initdb + postgres on a free loopback port; ``database()`` makes a migrated database in a blink."""

    def __init__(
        self, bin_dir: Path, host: str = "127.0.0.1", prefix: Sequence[str] = (), durable: bool = False
    ) -> None:
        """``host``: the address it listens on; ``prefix``: a command that runs it elsewhere (e.g. in a
        network namespace of support/netns.py); ``durable``: PostgreSQL's default durability, for tests that
        crash it (without, a commit acknowledged just before a SIGKILL is lost in recovery)."""
        self._bin = bin_dir
        self._durable = durable
        self.host = host
        self._prefix = list(prefix)
        self.root = Path(tempfile.mkdtemp(prefix="fluxserve-pg-"))
        self.port = free_port()
        self._names = itertools.count()
        self._process: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL will not run as root: hand the directory to its own user
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        data = self.root / "data"
        subprocess.run(
            [*self._as_user, str(self._bin / "initdb"), "-D", str(data), "-U", _SUPERUSER, "--auth=trust",
             "-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True, capture_output=True,
        )  # fmt: skip
        if self.host != "127.0.0.1":  # initdb trusts loopback only: trust the test hosts' subnet too
            with (data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet trust\n")
        for _ in range(3):  # a port taken by another process between free_port() and the bind: another
            if self._serve(data, f"CREATE DATABASE {TEMPLATE}"):  # ours: another cluster would have it
                break
            self.port = free_port()
        else:
            raise RuntimeError(f"postgres did not start: {self.log()}")
        template = open_database(self.url(TEMPLATE))
        migrate(template)
        template.dispose()  # a template must have no connections while it is copied

    def _serve(self, data: Path, probe: str) -> bool:
        """Run postgres on ``self.port`` until it runs ``probe`` (True) or exits (False)."""
        log = (self.root / "postgres.log").open("ab")
        # Durability off unless asked for: a test cluster is thrown away, and fsync would cost most of the
        # tests' time.
        fast = (
            []
            if self._durable
            else ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        )
        self._process = subprocess.Popen(
            [*self._prefix, *self._as_user, str(self._bin / "postgres"), "-D", str(data),
             "-p", str(self.port), "-h", self.host, "-k", str(self.root), *fast,
             "-c", "max_connections=300", "-c", "shared_buffers=32MB"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while self._process.poll() is None:
            try:
                self._admin(probe)
                return True
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log()}") from None
                time.sleep(0.1)
        return False

    def log(self) -> str:
        return (self.root / "postgres.log").read_text()[-3000:]

    def database(self, empty: bool = False) -> str:
        """A new database with the current schema (or none: ``empty``); returns its URL."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE {'template0' if empty else TEMPLATE}")
        return self.url(name)

    def drop(self, url: str) -> None:
        """Drop a test's database, closing connections the test left open."""
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[-1]} WITH (FORCE)")

    def _admin(self, statement: str) -> None:
        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with admin.connect() as conn:
                conn.execute(text(statement))
        finally:
            admin.dispose()

    def restart(self, down: float = 0.0) -> float:
        """A clean restart, as ``pg_ctl restart -m fast`` makes one: clients are disconnected, the server
        shuts down, stays down ``down`` seconds and starts again on the same data and port. Returns when
        (``time.monotonic()``) it took connections again."""
        self.halt()
        time.sleep(down)
        return self.serve_again()

    def kill_postmaster(self, down: float = 0.0) -> float:
        """A crash: SIGKILL to the postmaster, ``down`` seconds, then a start on the same data and port,
        which recovers from the WAL once the orphaned backends have noticed and gone. Returns when
        (``time.monotonic()``) it took connections again."""
        self.halt(signal.SIGKILL)
        time.sleep(down)
        return self.serve_again()

    def halt(self, how: signal.Signals = signal.SIGINT) -> None:
        """Stop the server (SIGINT: PostgreSQL's fast shutdown) and leave it down."""
        assert self._process is not None
        self._process.send_signal(how)
        self._process.wait(timeout=30)

    def serve_again(self) -> float:
        """Start the halted server on its data and port; returns when (``time.monotonic()``) it took
        connections."""
        deadline = time.monotonic() + 60
        # A new postmaster refuses the data dir while backends of a killed one still hold its memory.
        while not self._serve(self.root / "data", "SELECT 1"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start again: {self.log()}")
            time.sleep(0.2)
        return time.monotonic()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, stop
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL cluster (one per pytest-xdist worker)."""
    cluster = PostgresCluster(required_binaries())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    url = postgres.database()
    yield url
    postgres.drop(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test runs twice: on a new SQLite file, and on a fresh, migrated PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fluxserve.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def database(database_url: str) -> Iterator[Engine]:
    """The test's database on each of them, migrated; disposed of after the test."""
    database = open_database(database_url)
    migrate(database)
    yield database
    database.dispose()
