"""A wake-up when the job table may have changed, so that event streams need not poll every row often.

On SQLite, ``PRAGMA data_version`` on one connection changes whenever another connection (in any process)
commits: one watcher per API process reads it every ``PROBE_SECONDS`` while a stream waits, and wakes
every waiting stream at once; each then reads its own row. Elsewhere (PostgreSQL: LISTEN/NOTIFY would be
its counterpart, not built) there is no probe, and waiters wake at their timeout, i.e. they poll.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import suppress
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine

# One tiny pragma per probe for all of a process's streams; also the fastest a stream re-reads its row when
# the database is busy with other jobs' commits.
PROBE_SECONDS = 0.02


def _data_version(connection: Any) -> int:
    return int(connection.execute("PRAGMA data_version").fetchone()[0])


class DatabaseChanges:
    """``await changes.wait(timeout)`` returns after the next commit by anyone, or after ``timeout``."""

    def __init__(self, engine: Engine, probe_seconds: float = PROBE_SECONDS) -> None:
        self._engine = engine
        self._probe_seconds = probe_seconds
        self._probing = engine.dialect.name == "sqlite"
        self._changed = asyncio.Event()
        self._waiters = 0
        self._watcher: asyncio.Task[None] | None = None

    async def wait(self, timeout: float) -> None:
        if not self._probing:
            await asyncio.sleep(timeout)
            return
        changed = self._changed
        self._waiters += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())
        try:
            with suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
        finally:
            self._waiters -= 1

    async def _watch(self) -> None:
        """Runs while anyone waits; on a change, wakes them all and gives later waiters a fresh event."""
        connection = await anyio.to_thread.run_sync(self._engine.raw_connection)
        try:
            last = await anyio.to_thread.run_sync(_data_version, connection)
            while self._waiters:
                await asyncio.sleep(self._probe_seconds)
                try:
                    now = await anyio.to_thread.run_sync(_data_version, connection)
                except sqlite3.Error:  # a busy or broken moment: waiters still wake at their timeout
                    continue
                if now != last:
                    last = now
                    changed, self._changed = self._changed, asyncio.Event()
                    changed.set()
        finally:
            await anyio.to_thread.run_sync(connection.close)
