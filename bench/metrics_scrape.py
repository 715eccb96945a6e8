"""A storm of anonymous /metrics scrapes on a database of finished jobs, and what another key's fetches and
/readyz answer meanwhile.

    python -m bench.metrics_scrape [--tree PATH] [--rows 300000] [--scrapers 16] [--seconds 30]
                                   [--intervals 1,0] [--paths /metrics,/healthz]

``--tree`` is the source tree whose server is measured (default: this one), e.g. the main branch checked
out with ``git worktree add /tmp/before-metrics main``: its ``src`` goes first on the server's PYTHONPATH,
and its own code migrates and fills the database, so either schema works. The database is SQLite in a
scratch directory, filled with ``--rows`` ended jobs of two models by one SQL statement (the rows written
as the store writes them). One ``fluxserve serve --no-workers`` process serves it; one job of a second key
waits in the queue.

For ``--seconds``, ``--scrapers`` threads without a key (in a process of their own) scrape ``/metrics``,
each waiting one of ``--intervals`` between its scrapes (0: back to back; each scrape times out after 60 s
and is then abandoned), while one client fetches the queued job with its key every 0.1 s and another asks
``/readyz`` every 0.5 s. Reported: scrape latency percentiles, fetch latency before
and during the storm (and how many took over 1 s or failed), and /readyz's statuses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parents[1]
FILL = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :rows - 1),
t(i, created) AS (SELECT i, julianday('2026-01-01') + i / 86400.0 FROM n)
INSERT INTO jobs (id, key_id, model, surface, status, params, seed, output_format, prompt, cost_hundredths,
                  progress, details, attempts, cancel_requested, created_at, started_at, finished_at, turn)
SELECT printf('%08d-0000-4000-8000-000000000000', i), :key,
       CASE i % 2 WHEN 0 THEN 'flux-dev' ELSE 'flux-schnell' END, 'reseller',
       CASE i % 10 WHEN 0 THEN 'failed' WHEN 1 THEN 'canceled' ELSE 'succeeded' END,
       '{}', i, 'jpeg', 'a prompt', 250, 1.0, '{}', 1, 0,
       strftime('%Y-%m-%d %H:%M:%S', created) || '.000000',
       strftime('%Y-%m-%d %H:%M:%S', created + (i % 37) / 86400.0) || '.000000',
       strftime('%Y-%m-%d %H:%M:%S', created + (i % 37 + 2 + i % 13) / 86400.0) || '.000000',
       i
FROM t
"""


def fill(url: str, rows: int) -> None:
    """Run with the measured tree's code first on the path: its migrations, its schema."""
    from sqlalchemy import text

    from fluxserve.accounts.keys import KeyStore
    from fluxserve.db.connection import migrate, open_database

    database = open_database(url)
    migrate(database)
    key = KeyStore(database).create("history").record
    with database.begin() as conn:
        conn.execute(text(FILL), {"rows": rows, "key": key.id})
    database.dispose()


def percentiles(values: list[float]) -> str:
    if not values:
        return "none"
    p90, p99 = (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]
        for q in (90, 99)
    )
    return (
        f"n={len(values)} p50={statistics.median(values) * 1000:.0f} ms p90={p90 * 1000:.0f} ms "
        f"p99={p99 * 1000:.0f} ms max={max(values) * 1000:.0f} ms"
    )


def timed(client: httpx.Client, url: str, **kwargs: object) -> tuple[float, int]:
    """Seconds and status of one GET; 0 for a timeout or a dropped connection."""
    start = time.perf_counter()
    try:
        status = client.get(url, **kwargs).status_code  # type: ignore[arg-type]
    except httpx.HTTPError:
        status = 0
    return time.perf_counter() - start, status


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, default=HERE)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--scrapers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--intervals",
        default="1,0",
        help="seconds between one scraper's scrapes, one storm each (0: back to back)",
    )
    parser.add_argument(
        "--paths",
        default="/metrics",
        help="what the scrapers ask for, a storm each (/healthz: the HTTP floor)",
    )
    parser.add_argument("--path", default="/metrics", help=argparse.SUPPRESS)  # internal: of one storm
    parser.add_argument("--fill", help=argparse.SUPPRESS)  # internal: fill this database and exit
    parser.add_argument("--scrape", help=argparse.SUPPRESS)  # internal: be the scrapers of this server
    parser.add_argument("--interval", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fill:
        fill(args.fill, args.rows)
        return
    if args.scrape:
        print(json.dumps(scrape(args.scrape, args.path, args.scrapers, args.interval, args.seconds)))
        return
    from bench.engine import serve  # here: it imports torch, which the scrapers' process does without

    env = {**os.environ, "PYTHONPATH": f"{args.tree.resolve() / 'src'}:{HERE}", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch)
        started = time.perf_counter()
        database = f"sqlite:///{data / 'fluxserve.db'}"
        subprocess.run(
            [sys.executable, "-m", "bench.metrics_scrape", "--fill", database, "--rows", str(args.rows)],
            env=env,
            check=True,
        )
        print(f"tree {args.tree}: {args.rows} ended jobs written in {time.perf_counter() - started:.0f} s")
        server, base, key = serve(data, {**env, "FLUXSERVE_WORKERS": "0"})
        try:
            for path in args.paths.split(","):
                for interval in (float(value) for value in args.intervals.split(",")):
                    measure(base, key, path, args.scrapers, interval, args.seconds)
        finally:
            server.terminate()  # the old server waits for its abandoned scrapes: not for long
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def scrape(base: str, path: str, scrapers: int, interval: float, seconds: float) -> list[tuple[float, int]]:
    """``scrapers`` threads scraping for ``seconds`` (in their own process, so that their work does not
    slow the measuring client's); each scrape that is still unanswered then finishes or times out."""
    stop = threading.Event()
    scrapes: list[tuple[float, int]] = []

    def one() -> None:
        with httpx.Client(base_url=base, timeout=60) as anonymous:
            while not stop.is_set():
                scrapes.append(timed(anonymous, path))
                stop.wait(interval)

    threads = [threading.Thread(target=one) for _ in range(scrapers)]
    for thread in threads:
        thread.start()
    print("started", flush=True)  # the measuring client starts its clock now
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return scrapes


def measure(base: str, key: str, path: str, scrapers: int, interval: float, seconds: float) -> None:
    keyed = httpx.Client(base_url=base, headers={"TT-API-KEY": key}, timeout=60)
    job = keyed.post("/bfl/v1/flux-dev", json={"prompt": "p", "width": 256, "height": 256})
    job.raise_for_status()
    fetch_url = f"/flux/fetch?jobId={job.json()['data']['jobId']}"
    quiet = [timed(keyed, fetch_url) for _ in range(50)]
    print(f"\n{scrapers} scrapers of {path}, {interval:g} s between one's scrapes, {seconds:g} s")
    print(f"fetch, quiet:      {percentiles([t for t, _ in quiet])}")

    stop = threading.Event()
    ready: list[tuple[float, int]] = []

    def readiness() -> None:
        with httpx.Client(base_url=base, timeout=60) as anonymous:
            while not stop.wait(0.5):
                ready.append(timed(anonymous, "/readyz"))

    command = [sys.executable, "-m", "bench.metrics_scrape", "--scrape", base, "--path", path]
    command += ["--scrapers", str(scrapers)]
    command += ["--interval", str(interval), "--seconds", str(seconds)]
    storm = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert storm.stdout is not None and storm.stdout.readline().strip() == "started"
    checker = threading.Thread(target=readiness)
    checker.start()
    fetches: list[tuple[float, int]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        fetches.append(timed(keyed, fetch_url))
        time.sleep(0.1)
    stop.set()
    checker.join()
    output, _ = storm.communicate()
    scrapes = [(float(t), int(status)) for t, status in json.loads(output)]
    slow = sum(1 for t, status in fetches if status != 200 or t > 1.0)
    print(f"scrapes:           {percentiles([t for t, s in scrapes if s == 200])}")
    print(f"  statuses: {sorted({s for _, s in scrapes})} ({sum(1 for _, s in scrapes if s != 200)} not 200)")
    print(f"fetch, storm:      {percentiles([t for t, _ in fetches])}")
    statuses = sorted({status for _, status in fetches})
    print(f"  {slow} of {len(fetches)} fetches failed or took over 1 s; statuses {statuses}")
    print(
        f"/readyz, storm:    {percentiles([t for t, _ in ready])}; statuses {sorted({s for _, s in ready})}"
    )
    print(f"  {sum(1 for _, s in ready if s != 200)} of {len(ready)} not 200")


if __name__ == "__main__":
    main()
