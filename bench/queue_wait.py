"""Queue wait on PostgreSQL, from a job's submit to a worker's start: idle workers that poll against idle
workers woken by the change feed (LISTEN/NOTIFY, ``jobs/feed.py``).

    python -m bench.queue_wait [--jobs 200] [--workers 4] [--gap-ms 100] [--run-ms 20]

A throwaway cluster is started with tests/support/pg_server.py (Debian's binaries); each mode gets a fresh
database. Worker threads run the real claim loop of the store (claim, else
``wait_for_work``) on their own database handle, as a worker process does; a submitter on another (the API
process) sends jobs through ``Submitter`` at random (exponential) intervals; each job "runs" for
``--run-ms``. The wait is the job's ``started_at - created_at`` as the database records them. Idle
queries counts the claims that found nothing: the polling load on the database.

Then the cost of one claim with ``--backlog`` jobs queued by 50 keys, on PostgreSQL and on SQLite.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, insert, select

from fluxserve.accounts.keys import KeyStore
from fluxserve.core.job import JobStatus
from fluxserve.core.models import SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.db.connection import migrate, open_database, utcnow
from fluxserve.db.tables import api_keys, jobs
from fluxserve.jobs.feed import ChangeFeed, PostgresFeed
from fluxserve.jobs.store_sql import SqlClaims, SqlSubmissions
from fluxserve.jobs.submit import Limits, Submitter
from fluxserve.safety.fetch import NetworkPolicy
from fluxserve.storage.local import LocalBlobStore
from tests.support.pg_server import DEBIAN, PostgresCluster, binaries


@dataclass(frozen=True)
class Mode:
    name: str
    poll_seconds: float
    feed: Callable[[Engine], ChangeFeed | None]


MODES = [
    Mode("poll every 1 s", 1.0, lambda _: None),
    Mode("poll every 0.2 s", 0.2, lambda _: None),
    Mode("change feed, poll every 5 s (default)", 5.0, PostgresFeed),
]


def run(url: str, mode: Mode, count: int, workers: int, gap: float, run_seconds: float) -> dict[str, float]:
    submit_database, worker_database = open_database(url), open_database(url)
    keys = KeyStore(submit_database)
    key = keys.create(f"bench-{mode.poll_seconds}").record
    limits = Limits(count + 1, {}, 2**20, 2**22)
    submissions = SqlSubmissions(submit_database)  # its commits NOTIFY through the triggers; it never waits
    submitter = Submitter(submissions, LocalBlobStore(Path(tempfile.mkdtemp())), limits, NetworkPolicy([]))
    feed = mode.feed(worker_database)
    store = SqlClaims(worker_database, feed)
    if feed is not None:
        assert feed.ready(30)
    stop = threading.Event()
    idle = [0] * workers

    def work(index: int) -> None:
        while not stop.is_set():
            job = store.claim(f"w{index}")
            if job is None:
                idle[index] += 1
                store.wait_for_work(stop, mode.poll_seconds)
                continue
            time.sleep(run_seconds)
            store.finish(job.id, f"w{index}", JobStatus.SUCCEEDED)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(workers)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # every worker idle and waiting
    idle_before = sum(idle)
    started = time.monotonic()
    randomness = random.Random(14)
    for _ in range(count):
        time.sleep(randomness.expovariate(1 / gap))
        params = GenerationParams(model="flux-dev", prompt="bench", width=256, height=256)
        submitter.submit(key, params, 1, None, SurfaceName.RESELLER)
    while True:
        with worker_database.connect() as conn:
            left = conn.execute(select(jobs.c.id).where(jobs.c.status != JobStatus.SUCCEEDED.value)).first()
        if left is None:
            break
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join()
    with worker_database.connect() as conn:
        rows = conn.execute(select(jobs.c.created_at, jobs.c.started_at)).all()
    waits = sorted((start - created).total_seconds() * 1000 for created, start in rows)
    if feed is not None:
        feed.close()
    submit_database.dispose()
    worker_database.dispose()
    return {
        "median": statistics.median(waits),
        "p95": waits[int(len(waits) * 0.95) - 1],
        "max": waits[-1],
        "idle_per_s": (sum(idle) - idle_before) / elapsed,
    }


def claim_cost(url: str, backlog: int, keys: int = 50, claims: int = 200) -> float:
    """Milliseconds per claim (claim and finish, as a worker does) with ``backlog`` jobs queued."""
    database = open_database(url)
    migrate(database)
    now = utcnow()
    key_ids = [str(uuid.uuid4()) for _ in range(keys)]
    with database.begin() as conn:
        conn.execute(
            insert(api_keys),
            [
                {"id": k, "name": k, "key_hash": k, "key_prefix": "p", "webhook_secret": "s", "active": True,
                 "created_at": now}
                for k in key_ids
            ],
        )  # fmt: skip
        conn.execute(
            insert(jobs),
            [
                {"id": str(uuid.uuid4()), "key_id": key_ids[i % keys], "model": "flux-dev",
                 "status": "queued", "params": {}, "seed": 1, "width": 256, "height": 256,
                 "output_format": "png", "prompt": "p",
                 "cost_hundredths": 0, "progress": 0.0, "details": {}, "attempts": 0,
                 "cancel_requested": False, "created_at": now + timedelta(microseconds=i), "turn": i // keys}
                for i in range(backlog)
            ],
        )  # fmt: skip
    store = SqlClaims(database)
    started = time.perf_counter()
    for _ in range(claims):
        job = store.claim("w")
        assert job is not None
        store.finish(job.id, "w", JobStatus.SUCCEEDED)
    cost = (time.perf_counter() - started) / claims * 1000
    database.dispose()
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--gap-ms", type=float, default=100.0, help="mean time between submits")
    parser.add_argument("--run-ms", type=float, default=20.0, help="how long each job runs")
    parser.add_argument("--backlog", type=int, default=10_000, help="queued jobs for the claim cost")
    args = parser.parse_args()
    bin_dir = binaries()
    if bin_dir is None:
        sys.exit(f"no PostgreSQL binaries under {DEBIAN}: apt-get install postgresql")
    cluster = PostgresCluster(bin_dir)
    cluster.start()
    try:
        print(f"{args.jobs} jobs, {args.workers} idle worker threads, a submit every {args.gap_ms:g} ms on "
              f"average, {args.run_ms:g} ms a job")  # fmt: skip
        print(f"{'mode':40} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} {'idle claims/s':>14}")
        for mode in MODES:
            figures = run(
                cluster.database(), mode, args.jobs, args.workers, args.gap_ms / 1000, args.run_ms / 1000
            )
            print(
                f"{mode.name:40} {figures['median']:10.1f} {figures['p95']:8.1f} {figures['max']:8.1f} "
                f"{figures['idle_per_s']:14.1f}"
            )
        print("\none claim and finish (ms), by jobs queued by 50 keys:")
        for backlog in (200, args.backlog):
            with tempfile.TemporaryDirectory() as folder:
                sqlite = claim_cost(f"sqlite:///{folder}/bench.db", backlog)
            postgres = claim_cost(cluster.database(), backlog)
            print(f"  {backlog:>6} queued: PostgreSQL {postgres:.2f}, SQLite {sqlite:.2f}")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
