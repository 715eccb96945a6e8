"""Wake-ups: how an idle worker learns that a job was queued. ``wiring.make_job_store`` picks one.

- :class:`Polling` (SQLite): nothing is announced and an idle worker looks again after its poll interval.
  SQLite has no cross-process signal (``serve`` submits in the API process and runs jobs in worker
  processes), and a claim on an idle queue is one indexed query, so a short poll is the honest choice.
- :class:`PostgresNotify`: the transaction that queues jobs also sends ``NOTIFY`` with their number
  (PostgreSQL delivers it at commit, never for a rolled-back submit); one listening connection per process
  wakes that many idle worker threads of the process, not all of them (each process hears every
  notification, so each wakes one thread per job). The poll interval stays as a fallback (a notification
  missed while the listener reconnects), so it can be long.
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
    def announce(self, conn: Connection, jobs: int = 1) -> None:
        """Say, inside the transaction that queued ``jobs`` jobs, that idle workers should look (sent at
        commit)."""
        ...

    def wait(self, stop: threading.Event, timeout: float) -> None:
        """Return when work was announced (also while this worker was not yet waiting: after a claim that
        found nothing), when ``stop`` is set, or after ``timeout`` seconds."""
        ...


class Polling:
    """No announcements; a waiting worker sleeps its poll interval (or until it is stopped)."""

    def announce(self, conn: Connection, jobs: int = 1) -> None:
        return None

    def wait(self, stop: threading.Event, timeout: float) -> None:
        stop.wait(timeout)


class PostgresNotify:
    """LISTEN/NOTIFY on :data:`CHANNEL`, with one listening connection per process, opened on first wait
    (an API process that never waits opens none)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._changed = threading.Condition()
        self._pending = 0  # wake-ups heard and not yet taken by a waiting thread
        self._waiting = 0  # threads in wait() now
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        self._closed = threading.Event()

    def announce(self, conn: Connection, jobs: int = 1) -> None:
        conn.execute(select(func.pg_notify(CHANNEL, str(jobs))))

    def wait(self, stop: threading.Event, timeout: float) -> None:
        self._ensure_listener()
        deadline = time.monotonic() + timeout
        with self._changed:
            self._waiting += 1
            try:
                while not self._pending and not stop.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self._changed.wait(min(remaining, _STOP_CHECK_SECONDS))
                if self._pending:
                    self._pending -= 1
            finally:
                self._waiting -= 1

    def listening(self, timeout: float) -> bool:
        """Whether the listener is connected (tests and benchmarks wait for it before submitting)."""
        self._ensure_listener()
        return self._listening.wait(timeout)

    def _ensure_listener(self) -> None:
        with self._changed:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="job-wakeups", daemon=True)
                self._listener.start()

    def _wake(self, jobs: int | None = None) -> None:
        """Hand out wake-ups for ``jobs`` jobs (None: everyone). At most one more than there are waiting
        threads is kept: the one for a thread between a claim that found nothing and its wait."""
        with self._changed:
            wanted = self._waiting + 1 if jobs is None else jobs
            self._pending = min(self._pending + wanted, self._waiting + 1)
            self._changed.notify(wanted)

    def close(self) -> None:
        """Stop listening and close the connection; the process's end does it otherwise."""
        self._closed.set()
        if self._listener is not None:
            self._listener.join(_RECONNECT_SECONDS * 5)

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
                self._wake()  # what was queued while nobody listened is looked for now
                self._listening.set()
                if failing:
                    log.info("job wake-up listener reconnected")
                failing = False
                while not self._closed.is_set():
                    for notification in connection.notifies(timeout=_STOP_CHECK_SECONDS * 4):
                        self._wake(_count(notification.payload))
            except Exception:
                if not failing:
                    log.exception("job wake-up listener lost its connection; idle workers poll meanwhile")
                failing = True
            finally:
                self._listening.clear()
                if connection is not None:
                    connection.close()
            self._closed.wait(_RECONNECT_SECONDS)


def _count(payload: str) -> int:
    """The number of jobs a notification announces (1 for anything else: waking too many costs a claim)."""
    try:
        return max(1, int(payload))
    except ValueError:
        return 1
