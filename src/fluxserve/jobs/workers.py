"""Which worker processes are alive, wherever they run: each one's beacon (``worker/beacon.py``) refreshes
its row in the ``workers`` table every few seconds while none of its engines is stalled, and the process
removes it when it stops. ``/readyz`` and ``/metrics`` count the rows seen recently, so workers on other
machines are seen as well as the ones a local ``serve`` supervises (whose beacon files only that supervisor
reads)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import Engine, delete, func, insert, select, update

from fluxserve.db.connection import utcnow
from fluxserve.db.tables import workers

FORGET_AFTER = timedelta(days=1)  # rows of processes that died without removing them go after this


def process_name() -> str:
    """This process's name among workers: ``<host>-<pid>`` (its worker threads add ``-<n>``)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerRegistry:
    def __init__(self, database: Engine) -> None:
        self._database = database

    def seen(self, name: str, threads: int) -> None:
        """Say that the process ``name`` is alive now (its row is made on the first beat)."""
        now = utcnow()
        with self._database.begin() as conn:
            seen = conn.execute(update(workers).where(workers.c.id == name).values(seen_at=now))
            if seen.rowcount == 0:  # only this process writes its row: no race between update and insert
                host, _, pid = name.rpartition("-")
                conn.execute(
                    insert(workers).values(
                        id=name, host=host, pid=int(pid), threads=threads, started_at=now, seen_at=now
                    )
                )
                conn.execute(delete(workers).where(workers.c.seen_at < now - FORGET_AFTER))

    def leave(self, name: str) -> None:
        with self._database.begin() as conn:
            conn.execute(delete(workers).where(workers.c.id == name))

    def live(self, seen_within: float) -> int:
        """Worker processes heard from in the last ``seen_within`` seconds."""
        since = utcnow() - timedelta(seconds=seen_within)
        with self._database.connect() as conn:
            return int(conn.scalar(select(func.count()).where(workers.c.seen_at >= since)) or 0)
