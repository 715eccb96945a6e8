"""Requests per second of one and of two API replicas, against a bare FastAPI app, in one run.

    python -m bench.replicas [--database sqlite|postgresql] [--replicas 1|2] [--connections 16]
                             [--duration 10] [--warmup 2] [--rounds 3] [--keys 16]

Needs Debian's ``wrk`` (``apt-get install wrk``), and for ``--database postgresql`` PostgreSQL binaries (as
tests/support/pg_server.py). The servers run on loopback at once:

- bare: a FastAPI app of two trivial sync routes on fluxserve's paths, run by ``uvicorn.run`` on its
  default settings (httptools where installed, its access log on): the ceiling a FastAPI service on this
  machine reaches, not one slowed to fluxserve's own HTTP settings;
- replicas A (and B with ``--replicas 2``): ``fluxserve serve --no-workers`` (no worker, no torch) on one
  database (a SQLite file in one data directory, or a throwaway PostgreSQL cluster on its default
  durability: fsync and synchronous commit on), keys with unlimited credits, FLUXSERVE_MAX_ACTIVE_JOBS
  raised so no 429s.

Each measurement is ``--connections`` keep-alive connections for ``--duration`` seconds from wrk (one
thread per wrk process): "submit" is ``POST /bfl/v1/flux-dev`` with a prompt, "fetch" is
``GET /flux/fetch?jobId=`` of one existing job; "two replicas" is two wrk processes at once, each with half
the connections, on A and on B, their latency histograms merged. Every request uses one key; submits are
measured again taking turns over ``--keys`` keys, since fluxserve serialises the submits of one key.

wrk, not a Python client: a C event loop spends a small fraction of what the servers spend per request,
and on this 2-core machine every cycle the load generator takes is a cycle the servers lose. Submit runs
start from an empty queue (the jobs of the previous run deleted, and on PostgreSQL the tables vacuumed),
since a longer queue makes a key's active-job count dearer. Each round measures every case; odd rounds in
the reverse order, so that drift in the machine's load falls on both sides of a ratio. CPU use of each
part is read from the processes (psutil) and the rest of the machine from /proc/stat: on a shared 2-core
machine that is what says what limited a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import delete, func, select, text

from fluxserve.accounts.keys import KeyStore
from fluxserve.db.connection import migrate, open_database
from fluxserve.db.tables import jobs
from tests.conftest import free_port
from tests.support.pg_server import DEBIAN, PostgresCluster, binaries

SCRIPT = Path(__file__).with_name("replicas.lua")
SUBMIT_BODY = json.dumps({"prompt": "a large red heart in the center on a blue background"})


class Prompt(BaseModel):
    prompt: str


def bare_app() -> FastAPI:
    """The ceiling: fluxserve's two paths as trivial sync routes (run in the threadpool, as FastAPI runs a
    plain ``def``), answering in the reseller's envelope without any work."""
    app = FastAPI()

    @app.post("/bfl/v1/flux-dev")
    def submit(body: Prompt) -> dict[str, object]:
        return {"status": "SUCCESS", "message": "", "data": {"jobId": "bare", "job_id": "bare"}}

    @app.get("/flux/fetch")
    def fetch(jobId: str) -> dict[str, object]:
        return {"status": "SUCCESS", "message": "", "data": {"jobId": jobId, "status": "PENDING_QUEUE"}}

    return app


def serve_bare(argv: list[str]) -> None:
    """:func:`bare_app` on uvicorn's defaults; only the address is given (``--host``, ``--port``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    address = parser.parse_args(argv)
    uvicorn.run(bare_app(), host=address.host, port=address.port)


@dataclass
class Server:
    process: psutil.Popen
    base_url: str


def start_server(name: str, command: list[str], env: dict[str, str], logs: Path) -> Server:
    """A server process on a free loopback port, returned once it answers HTTP (any status: the bare app has
    no /healthz)."""
    port = free_port()
    log = (logs / f"{name}.log").open("ab")
    process = psutil.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited: {(logs / f'{name}.log').read_text()[-3000:]}")
        try:
            httpx.get(f"{base_url}/healthz", timeout=1)
            return Server(process, base_url)
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not start: {(logs / f'{name}.log').read_text()[-3000:]}")


@dataclass
class Load:
    """What wrk measured: its processes' counts summed, their latency histograms (µs -> count) merged."""

    requests: int = 0
    rate: float = 0.0  # requests a second, all statuses
    failed: int = 0  # status above 399
    socket_errors: int = 0
    latency: Counter[int] = field(default_factory=Counter)

    def add(self, result: Path) -> None:
        counts: dict[str, int] = {}
        for line in result.read_text().splitlines():
            name, *values = line.split()
            if name == "latency_us":
                self.latency[int(values[0])] += int(values[1])
            else:
                counts[name] = int(values[0])
        self.requests += counts["requests"]
        self.rate += counts["requests"] / (counts["duration_us"] / 1e6)
        self.failed += counts["status_errors"]
        self.socket_errors += counts["socket_errors"]

    @property
    def ok_rate(self) -> float:
        return self.rate * (self.requests - self.failed) / self.requests if self.requests else 0.0

    def percentile_ms(self, percent: float) -> float:
        wanted, seen = sum(self.latency.values()) * percent / 100, 0
        for microseconds in sorted(self.latency):
            seen += self.latency[microseconds]
            if seen >= wanted:
                return microseconds / 1000
        return float("nan")


@dataclass(frozen=True)
class Cpu:
    """Percent of one core over a run (200 = both cores), per part of the machine."""

    api: float
    postgres: float
    wrk: float
    rest: float  # everything else: the idle servers, this script, and whatever else the machine runs


def _cpu_seconds(processes: Sequence[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def run_wrk(
    servers: Sequence[Server],
    op: str,
    path: str,
    keys: Sequence[str],
    connections: int,
    seconds: int,
    postmaster: psutil.Process | None,
) -> tuple[Load, Cpu]:
    """``connections`` split evenly over ``servers``, one wrk process each, all at once."""
    api = [server.process for server in servers]
    postgres = _postgres(postmaster)
    before_api, before_pg = _cpu_seconds(api), _cpu_seconds(postgres)
    before_wrk = resource.getrusage(resource.RUSAGE_CHILDREN)
    before_busy, started = _busy_seconds(), time.monotonic()
    with tempfile.TemporaryDirectory() as out, ExitStack() as stack:
        running = []
        for index, server in enumerate(servers):
            result = Path(out) / f"{index}.txt"
            env = {
                **os.environ,
                "BENCH_METHOD": "POST" if op == "submit" else "GET",
                "BENCH_KEYS": ",".join(keys),
                "BENCH_BODY": SUBMIT_BODY if op == "submit" else "",
                "BENCH_OUT": str(result),
            }
            command = [
                "wrk", "-t1", f"-c{connections // len(servers)}", f"-d{seconds}s", "--timeout", "10s",
                "-s", str(SCRIPT), server.base_url + path,
            ]  # fmt: skip
            log = stack.enter_context(open(Path(out) / f"{index}.log", "wb"))
            running.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), result))
        load = Load()
        for process, result in running:
            if process.wait() != 0 or not result.exists():
                raise RuntimeError(f"wrk failed: {result.with_suffix('.log').read_text()}")
            load.add(result)
        wall = time.monotonic() - started
        busy = _busy_seconds() - before_busy
    after_wrk = resource.getrusage(resource.RUSAGE_CHILDREN)
    postgres = _postgres(postmaster)  # backends opened during the run
    api_s = _spent(before_api, _cpu_seconds(api))
    pg_s = _spent(before_pg, _cpu_seconds(postgres))
    wrk_s = (after_wrk.ru_utime + after_wrk.ru_stime) - (before_wrk.ru_utime + before_wrk.ru_stime)
    cpu = Cpu(*(100 * part / wall for part in (api_s, pg_s, wrk_s, busy - api_s - pg_s - wrk_s)))
    return load, cpu


def _postgres(postmaster: psutil.Process | None) -> list[psutil.Process]:
    return [] if postmaster is None else [postmaster, *postmaster.children(recursive=True)]


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


@dataclass(frozen=True)
class Case:
    op: str  # "submit" or "fetch"
    server: str  # one of SERVERS
    keys: int = 1  # keys the requests take turns with

    @property
    def spread(self) -> bool:
        return self.keys > 1

    def __str__(self) -> str:
        return f"{self.server}, {self.keys} keys" if self.spread else self.server


BARE, ONE, TWO = SERVERS = ("bare FastAPI", "fluxserve, 1 replica", "fluxserve, 2 replicas")


def cases(keys: int, replicas: int = 2) -> list[Case]:
    """Each request on each server with one key; submits also spread over ``keys`` keys, whose submits
    fluxserve does not serialise (one key's do: its row is locked from the hold to the commit)."""
    servers = SERVERS if replicas == 2 else (BARE, ONE)
    spread = [Case("submit", server, keys) for server in servers[1:]] if keys > 1 else []
    return [
        *(Case("submit", server) for server in servers),
        *spread,
        *(Case("fetch", server) for server in servers),
    ]


ONE_KEY, SPREAD = False, True
RATIOS = (  # (name, numerator, denominator) as (server, spread): a case's rate over another's in a round
    ("fluxserve 1 replica / bare", (ONE, ONE_KEY), (BARE, ONE_KEY)),
    ("fluxserve 1 replica, many keys / bare", (ONE, SPREAD), (BARE, ONE_KEY)),
    ("2 replicas / 1 replica", (TWO, ONE_KEY), (ONE, ONE_KEY)),
    ("1 replica: many keys / one key", (ONE, SPREAD), (ONE, ONE_KEY)),
    ("2 replicas / 1 replica, many keys", (TWO, SPREAD), (ONE, SPREAD)),
)


@dataclass(frozen=True)
class Measure:
    case: Case
    round: int
    load: Load
    cpu: Cpu
    queued: int | None  # jobs in the table after a submit run


@dataclass(frozen=True)
class Setup:
    bare: Server
    replicas: list[Server]
    postmaster: psutil.Process | None  # None: SQLite
    database_url: str
    keys: list[str]  # unlimited credits each


@contextmanager
def setup(tmp: Path, keys: int, backend: str, replicas: int) -> Iterator[Setup]:
    """The bare server, and ``replicas`` fluxserve replicas on a fresh database (a SQLite file, or a
    PostgreSQL cluster on its default durability) with ``keys`` keys; stopped on exit."""
    cluster = None
    started: list[Server] = []
    try:
        if backend == "postgresql":
            bin_dir = binaries()
            if bin_dir is None:
                sys.exit(f"PostgreSQL binaries not found under {DEBIAN} (apt-get install postgresql)")
            cluster = PostgresCluster(bin_dir, durable=True)
            cluster.start()
            url = cluster.database()
        else:
            url = f"sqlite:///{tmp / 'api' / 'fluxserve.db'}"
        database = open_database(url)
        migrate(database)
        raw = [KeyStore(database).create(f"bench-{index}").key for index in range(keys)]
        database.dispose()
        # fluxserve's defaults, whatever this shell sets, but for the database and the active-job limit
        clean = {name: value for name, value in os.environ.items() if not name.startswith("FLUXSERVE_")}
        env = {**clean, "FLUXSERVE_DATABASE_URL": url, "FLUXSERVE_MAX_ACTIVE_JOBS": str(10**9)}
        started.append(start_server("bare", [sys.executable, "-m", "bench.replicas", "bare"], clean, tmp))
        fluxserve = [
            sys.executable,
            "-m",
            "fluxserve",
            "serve",
            "--no-workers",
            "--data-dir",
            str(tmp / "api"),
        ]
        names = ("replica-a", "replica-b")[:replicas]
        started.extend(start_server(name, fluxserve, env, tmp) for name in names)
        postmaster = None
        if (
            cluster is not None
        ):  # PostgreSQL's own record of its postmaster's pid: postmaster.pid's first line
            postmaster = psutil.Process(
                int((cluster.root / "data" / "postmaster.pid").read_text().split()[0])
            )
        yield Setup(started[0], started[1:], postmaster, url, raw)
    finally:
        for server in started:
            server.process.terminate()
            try:
                server.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.process.kill()
        if cluster is not None:
            cluster.stop()


def main() -> None:
    if sys.argv[1:2] == ["bare"]:
        serve_bare(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=16, help="wrk connections in all (even).")
    parser.add_argument("--duration", type=int, default=10, help="Seconds a measurement.")
    parser.add_argument("--warmup", type=int, default=2, help="Seconds of unmeasured load first.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=16, help="Keys of the spread submit cases (1: none).")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="postgresql")
    parser.add_argument("--replicas", type=int, choices=(1, 2), default=2, help="fluxserve API processes.")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    print(machine())
    with (
        tempfile.TemporaryDirectory(prefix="fluxserve-replicas-") as tmp,
        setup(Path(tmp), args.keys, args.database, args.replicas) as parts,
    ):
        every = cases(args.keys, args.replicas)
        measures = measure(parts, every, args.connections, args.duration, args.warmup, args.rounds)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(report(measures, args))


def measure(
    parts: Setup, every: list[Case], connections: int, seconds: int, warmup: int, rounds: int
) -> list[Measure]:
    """Every case ``rounds`` times, after a warm-up of each; odd rounds in the reverse order."""
    key = parts.keys[0]
    response = httpx.post(
        f"{parts.replicas[0].base_url}/bfl/v1/flux-dev", content=SUBMIT_BODY,
        headers={"TT-API-KEY": key, "Content-Type": "application/json"},
    )  # fmt: skip
    response.raise_for_status()
    job_id = response.json()["data"]["jobId"]
    paths = {"submit": "/bfl/v1/flux-dev", "fetch": f"/flux/fetch?jobId={job_id}"}
    servers = {BARE: [parts.bare], ONE: parts.replicas[:1], TWO: parts.replicas[:2]}
    database = open_database(parts.database_url)

    def empty_queue() -> int:
        """Delete every job but the fetched one; the number there was."""
        with database.begin() as conn:
            queued = conn.execute(select(func.count()).select_from(jobs)).scalar_one()
            conn.execute(delete(jobs).where(jobs.c.id != job_id))
        if parts.postmaster is not None:
            with database.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE jobs, api_keys"))
        return int(queued)

    def run(case: Case, duration: int) -> tuple[Load, Cpu]:
        keys = parts.keys[: case.keys]
        return run_wrk(
            servers[case.server], case.op, paths[case.op], keys, connections, duration, parts.postmaster
        )

    for case in every:  # warm-up: first requests compile queries, fill pools, open connections
        run(case, warmup)
    empty_queue()
    measures: list[Measure] = []
    for round_ in range(rounds):
        for case in every if round_ % 2 == 0 else every[::-1]:
            load, cpu = run(case, seconds)
            queued = empty_queue() if case.op == "submit" else None
            measures.append(Measure(case, round_, load, cpu, queued))
            print(f"round {round_ + 1} {case.op:6} {case!s:32} {load.ok_rate:8.1f}/s", flush=True)
    database.dispose()
    return measures


def machine() -> str:
    import fastapi
    import uvicorn

    memory = psutil.virtual_memory().total / 2**30
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split(" Copyright")[0]
    return (
        f"{os.cpu_count()} CPU cores, {memory:.0f} GiB; Python {platform.python_version()}, FastAPI "
        f"{fastapi.__version__}, uvicorn {uvicorn.__version__}; {wrk}\n"
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def report(measures: list[Measure], args: argparse.Namespace) -> str:
    """A markdown table of medians over the rounds, and the ratios of each round."""
    median = statistics.median
    lines = [
        f"{args.database}; {args.connections} connections, {args.duration} s a measurement, "
        f"{args.rounds} rounds; medians. "
        "CPU in % of one core (200 = the machine).",
        "",
        "| request | server | requests/s (2xx) | 4xx/5xx | p50 ms | p99 ms | CPU: API | PostgreSQL | wrk "
        "| rest of machine | API CPU ms a request | jobs at the end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rates: dict[tuple[str, str, bool], list[float]] = {}
    for case in dict.fromkeys(m.case for m in measures):
        runs = [m for m in measures if m.case == case]
        rates[case.op, case.server, case.spread] = [m.load.ok_rate for m in runs]
        queued = [m.queued for m in runs if m.queued is not None]
        lines.append(
            f"| {case.op} | {case} | {median(m.load.ok_rate for m in runs):.0f} | "
            f"{sum(m.load.failed + m.load.socket_errors for m in runs)} | "
            f"{median(m.load.percentile_ms(50) for m in runs):.1f} | "
            f"{median(m.load.percentile_ms(99) for m in runs):.1f} | "
            f"{median(m.cpu.api for m in runs):.0f} | {median(m.cpu.postgres for m in runs):.0f} | "
            f"{median(m.cpu.wrk for m in runs):.0f} | {median(m.cpu.rest for m in runs):.0f} | "
            f"{median(10 * m.cpu.api / m.load.rate for m in runs):.2f} | {median(queued) if queued else ''} |"
        )
    lines += ["", "| ratio (same round) | request | each round | median |", "|---|---|---|---|"]
    for name, top, bottom in RATIOS:
        for op in ("submit", "fetch"):
            tops, bottoms = rates.get((op, *top)), rates.get((op, *bottom))
            if tops is None or bottoms is None:
                continue
            ratios = [a / b for a, b in zip(tops, bottoms, strict=True)]
            each = ", ".join(f"{r:.2f}" for r in ratios)
            lines.append(f"| {name} | {op} | {each} | **{median(ratios):.2f}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
