"""Wake-ups: how an idle worker learns that a job was queued. ``wiring.make_job_store`` picks one.

- :class:`Polling` (SQLite): nothing is announced and an idle worker looks again after its poll interval.
  SQLite has no cross-process signal (``serve`` submits in the API process and runs jobs in worker
  processes), and a claim on an idle queue is one indexed query, so a short poll is the honest choice.
- :class:`PostgresNotify`: the transaction that queues a job also sends ``NOTIFY`` (PostgreSQL delivers it
  at commit, never for a rolled-back submit); one listening connection per process wakes every idle worker
  thread of the process at once. The poll interval stays as a fallback (a notification missed while the
  listener reconnects), so it can be long.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from sqlalchemy import Connection, Engine, func, select

log = logging.getLogger("fluxserve.jobs")

CHANNEL = "fluxserve_jobs"
_STOP_CHECK_SECONDS = 0.25  # how soon a waiting worker notices that its process is stopping
_RECONNECT_SECONDS = 1.0


class Wakeups(Protocol):
    def announce(self, conn: Connection) -> None:
        """Say, inside the transaction that queued work, that idle workers should look (sent at commit)."""
        ...

    def wait(self, stop: threading.Event, timeout: float) -> None:
        """Return when work was announced since the last claim attempt could have seen it, when ``stop``
        is set, or after ``timeout`` seconds."""
        ...


class Polling:
    """No announcements; a waiting worker sleeps its poll interval (or until it is stopped)."""

    def announce(self, conn: Connection) -> None:
        return None

    def wait(self, stop: threading.Event, timeout: float) -> None:
        stop.wait(timeout)


class PostgresNotify:
    """LISTEN/NOTIFY on :data:`CHANNEL`, with one listening connection per process, opened on first wait
    (an API process that never waits opens none)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._changed = threading.Condition()
        self._generation = 0  # bumped by every notification
        self._seen = threading.local()  # per worker thread: the generation its last wait returned at
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        self._closed = threading.Event()

    def announce(self, conn: Connection) -> None:
        conn.execute(select(func.pg_notify(CHANNEL, "")))

    def wait(self, stop: threading.Event, timeout: float) -> None:
        # A notification that came between this thread's last wait and now (while it claimed and found
        # nothing, or ran a job) returns at once: the claim before it may not have seen that job.
        self._ensure_listener()
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = getattr(self._seen, "generation", 0)
            while self._generation == seen and not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, _STOP_CHECK_SECONDS))
            self._seen.generation = self._generation

    def listening(self, timeout: float) -> bool:
        """Whether the listener is connected (tests and benchmarks wait for it before submitting)."""
        self._ensure_listener()
        return self._listening.wait(timeout)

    def _ensure_listener(self) -> None:
        with self._changed:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="job-wakeups", daemon=True)
                self._listener.start()

    def _wake(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def close(self) -> None:
        """Stop listening (the listener notices within a second); the process's end does it otherwise."""
        self._closed.set()

    def _listen(self) -> None:
        """Hold a LISTEN connection until closed, reconnecting after a failure (logged once per outage)."""
        failing = False
        while not self._closed.is_set():
            connection = None
            try:
                raw = self._engine.raw_connection()  # the engine's connect arguments, outside its pool
                connection = raw.driver_connection
                raw.detach()
                assert connection is not None
                connection.autocommit = True
                connection.execute(f"LISTEN {CHANNEL}")
                self._listening.set()
                if failing:
                    log.info("job wake-up listener reconnected")
                failing = False
                self._wake()  # what was queued while nobody listened is looked for now
                while not self._closed.is_set():
                    for _ in connection.notifies(timeout=_STOP_CHECK_SECONDS * 4):
                        self._wake()
            except Exception:
                if not failing:
                    log.exception("job wake-up listener lost its connection; idle workers poll meanwhile")
                failing = True
            finally:
                self._listening.clear()
                if connection is not None:
                    connection.close()
            self._closed.wait(_RECONNECT_SECONDS)
