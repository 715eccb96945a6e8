"""The change feed: one per process, it learns which jobs and API keys changed and wakes what waits.

Triggers (migration 0010) announce every change of a job's status, progress or attempts and every change of
an API key, in the changing transaction, so no code path can forget; a heartbeat alone announces nothing.
``wiring.make_feed`` picks the implementation:

- :class:`PostgresFeed`: one ``LISTEN`` connection per process. A notification names the job (its status,
  whether it has a webhook) or the key. After a lost connection it listens again and, since a notification
  may have been lost in the gap, tells every subscriber that anything may have changed (``None``).
- :class:`SqliteFeed`: one probe per process of ``PRAGMA data_version`` (it moves when any other
  connection, in any process, commits) every ``PROBE_SECONDS``; when it moved, one read of the rows whose
  ``change_seq`` passed the last one seen. A busy or locked moment is retried at the next probe.

Subscribers are called on the feed's thread with a batch of changes and must return quickly (hand over to
their own thread or event loop). Idle worker threads of the process wait in :meth:`ChangeFeed.wait_for_work`
and are woken, one per queued job, without a subscription.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Engine

from fluxserve.core.job import JobStatus

log = logging.getLogger("fluxserve.feed")

CHANNEL = "fluxserve_changes"  # the triggers' channel (migration 0010)
PROBE_SECONDS = 0.02  # SQLite: one tiny pragma this often per process, whoever waits
_STOP_CHECK_SECONDS = 0.25  # how soon a waiting worker notices that its process is stopping
_RECONNECT_SECONDS = 1.0


@dataclass(frozen=True)
class JobChange:
    """A job's status, progress or attempts changed (or it was written); ``webhook``: it has a webhook URL,
    so when ``status`` is terminal its delivery is due."""

    job_id: str
    status: JobStatus
    webhook: bool


JobListener = Callable[[Sequence[JobChange] | None], None]  # None: anything may have changed
KeyListener = Callable[[str | None], None]  # a key id; None: any key may have changed


def to_fetch(change: JobChange) -> bool:
    """The job entered the fetch stage: its URL inputs are to be downloaded."""
    return change.status is JobStatus.FETCHING


def webhook_due(change: JobChange) -> bool:
    """The job ended with a webhook, or (a Replicate prediction's ``start``) was claimed: a delivery written
    in the same transaction may be due."""
    return change.webhook and (change.status.is_terminal or change.status is JobStatus.RUNNING)


def wake_on(wanted: Callable[[JobChange], bool], wake: Callable[[], None]) -> JobListener:
    """A subscriber that calls ``wake`` once per batch holding a wanted change (and after a gap)."""

    def listener(changes: Sequence[JobChange] | None) -> None:
        if changes is None or any(wanted(change) for change in changes):
            wake()

    return listener


class _WorkSignal:
    """Wake-ups for idle worker threads: one per queued job, at most one more than there are waiters (for a
    thread between a claim that found nothing and its wait)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._pending = 0
        self._waiting = 0

    def wait(self, stop: threading.Event, timeout: float) -> None:
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

    def wake(self, jobs: int | None) -> None:
        """Wake for ``jobs`` queued jobs (None: every waiting thread)."""
        with self._changed:
            wanted = self._waiting + 1 if jobs is None else jobs
            self._pending = min(self._pending + wanted, self._waiting + 1)
            self._changed.notify(wanted)

    @property
    def waiting(self) -> int:
        return self._waiting


class ChangeFeed:
    """The part both implementations share: subscribers, worker wake-ups, the thread and its life. The
    thread starts on :meth:`start` or the first :meth:`wait_for_work` (a CLI command that never waits
    opens no connection)."""

    def __init__(self, database: Engine) -> None:
        self._database = database
        self._job_listeners: list[JobListener] = []
        self._key_listeners: list[KeyListener] = []
        self.work = _WorkSignal()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # listening / probing now
        self._closed = threading.Event()

    def subscribe(self, callback: JobListener) -> None:
        """Call ``callback`` with each batch of job changes, or None when some may have been missed."""
        self._job_listeners.append(callback)

    def subscribe_keys(self, callback: KeyListener) -> None:
        """Call ``callback`` with the id of each changed API key (revoked, credits...), or None when any key
        may have changed (after a reconnect)."""
        self._key_listeners.append(callback)

    def wait_for_work(self, stop: threading.Event, timeout: float) -> None:
        """Block an idle worker thread until a job was queued, ``stop`` is set, or ``timeout`` passes."""
        self.start()
        self.work.wait(stop, timeout)

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="change-feed", daemon=True)
                self._thread.start()

    def ready(self, timeout: float) -> bool:
        """Whether the feed listens (probes) now, waiting up to ``timeout`` (tests and benchmarks)."""
        self.start()
        return self._ready.wait(timeout)

    def close(self) -> None:
        """Stop the thread and close its connection; the process's end does it otherwise."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(_RECONNECT_SECONDS * 5)

    def _publish(self, changes: Sequence[JobChange] | None, keys: Sequence[str | None] = ()) -> None:
        """Hand a batch to the worker signal and every subscriber; one failing subscriber stops no other."""
        if changes is None or changes:
            queued = None if changes is None else sum(c.status is JobStatus.QUEUED for c in changes)
            if queued is None or queued:
                self.work.wake(queued)
            for listener in self._job_listeners:
                self._call(listener, changes)
        for key in keys:
            for key_listener in self._key_listeners:
                self._call(key_listener, key)

    @staticmethod
    def _call(callback: Callable[[Any], None], argument: Any) -> None:
        try:
            callback(argument)
        except Exception:
            log.exception("a change feed subscriber failed")

    def _run(self) -> None:
        """Watch until closed; a lost connection is logged once per outage and opened again, then the gap
        is made up by telling everyone that anything may have changed."""
        failing = False
        while not self._closed.is_set():
            try:
                self._watch(partial(self._connected, failing))
            except Exception:
                if not failing:
                    log.exception("the change feed lost its connection; waiters fall back to their polls")
                failing = True
            finally:
                self._ready.clear()
            self._closed.wait(_RECONNECT_SECONDS)

    def _connected(self, was_failing: bool) -> None:
        self._ready.set()
        if was_failing:
            log.info("the change feed reconnected")
        self._publish(None, [None])  # what changed while nobody listened is looked for now

    def _watch(self, connected: Callable[[], None]) -> None:
        """Connect, call ``connected``, then publish changes until closed (raises when the connection
        fails)."""
        raise NotImplementedError


class PostgresFeed(ChangeFeed):
    """LISTEN on :data:`CHANNEL` on a connection of its own (the database's settings, outside its pool)."""

    def _watch(self, connected: Callable[[], None]) -> None:
        raw = self._database.raw_connection()
        connection = raw.driver_connection
        raw.detach()
        assert connection is not None
        try:
            connection.autocommit = True
            connection.execute(f"LISTEN {CHANNEL}")
            connected()
            while not self._closed.is_set():
                for notification in connection.notifies(timeout=_STOP_CHECK_SECONDS * 4):
                    changes: list[JobChange] = []
                    keys: list[str | None] = []
                    _parse(notification.payload, changes, keys)
                    self._publish(changes, keys)
        finally:
            connection.close()


def _parse(payload: str, changes: list[JobChange], keys: list[str | None]) -> None:
    """``j <id> <status> <0|1>`` or ``k <id>`` (anything else is logged and dropped)."""
    parts = payload.split(" ")
    try:
        if parts[0] == "j" and len(parts) == 4:
            changes.append(JobChange(parts[1], JobStatus(parts[2]), parts[3] == "1"))
            return
        if parts[0] == "k" and len(parts) == 2:
            keys.append(parts[1])
            return
    except ValueError:
        pass
    log.warning("change feed: an unknown notification %r", payload)


class SqliteFeed(ChangeFeed):
    """A probe of ``PRAGMA data_version`` on a connection of its own, then the rows changed since."""

    def __init__(self, database: Engine, probe_seconds: float = PROBE_SECONDS) -> None:
        super().__init__(database)
        self._probe_seconds = probe_seconds

    def _watch(self, connected: Callable[[], None]) -> None:
        raw = self._database.raw_connection()
        connection = raw.driver_connection
        raw.detach()
        assert connection is not None
        # Autocommit: each read sees the newest commit and holds no read transaction between probes.
        connection.isolation_level = None
        try:
            version = _data_version(connection)
            last_job = connection.execute(_LAST_JOB).fetchone()[0]
            last_key = connection.execute(_LAST_KEY).fetchone()[0]
            connected()
            while not self._closed.wait(self._probe_seconds):
                try:
                    now = _data_version(connection)
                    if now == version:
                        continue
                    job_rows = connection.execute(_CHANGED_JOBS, (last_job,)).fetchall()
                    key_rows = connection.execute(_CHANGED_KEYS, (last_key,)).fetchall()
                except sqlite3.OperationalError:
                    continue  # busy or locked for a moment: the next probe reads the same rows
                version = now
                if job_rows:
                    last_job = job_rows[-1][3]
                if key_rows:
                    last_key = key_rows[-1][1]
                changes = [JobChange(row[0], JobStatus(row[1]), bool(row[2])) for row in job_rows]
                self._publish(changes, [row[0] for row in key_rows])
        finally:
            connection.close()


_LAST_JOB = "SELECT coalesce(max(change_seq), 0) FROM jobs"
_LAST_KEY = "SELECT coalesce(max(change_seq), 0) FROM api_keys"
_CHANGED_JOBS = (
    "SELECT id, status, webhook_url IS NOT NULL, change_seq FROM jobs "
    "WHERE change_seq > ? ORDER BY change_seq"
)
_CHANGED_KEYS = "SELECT id, change_seq FROM api_keys WHERE change_seq > ? ORDER BY change_seq"


def _data_version(connection: Any) -> int:
    return int(connection.execute("PRAGMA data_version").fetchone()[0])
