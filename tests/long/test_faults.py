"""Faults of the parts fluxserve leans on, under load, on a real ``fluxserve serve`` (API and a worker
process): PostgreSQL restarted cleanly and its postmaster killed with SIGKILL, and the S3 server hung
(SIGSTOP) for 30 s.

Each asserts what is lost (nothing: every accepted submit ends SUCCESS, run once), what clients were
answered (200, or a 503 with Retry-After in the dialect's shape while the database is away; never a 500, never
a hang past the client's timeout) and that the server recovers without a restart. The recovery times are
printed (``pytest -s``), not asserted: BENCHMARKS.md ("Faults") has them.

S3 is hung, not restarted: moto keeps its objects in memory, so a restarted one would lose every result
stored before and "nothing lost" could not be checked; a hung store is also the harder case for timeouts
(it takes connections and never answers).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, ProgrammingError

from fluxserve.db.connection import Timeouts, open_database
from fluxserve.jobs.outage import database_away
from tests.conftest import ServerProcess
from tests.support.pg_server import PostgresCluster, required_binaries
from tests.support.s3_server import CREDENTIALS, MotoProcess, create_bucket, object_keys, storage_url

CLIENT_TIMEOUT = 20.0  # seconds: a call not answered by then counts as a hang
BODY = {"prompt": "a fault-tolerant lighthouse", "width": 256, "height": 256, "steps": 2}
# The defaults' ratio (a heartbeat every 5 s, stale after 30 s) at a tenth: a job whose worker is alive
# is not taken back during an outage of a few seconds (tests/conftest.py's 2 s would).
ENV = {
    "FLUXSERVE_LOG_JSON": "1",
    "FLUXSERVE_HEARTBEAT_SECONDS": "0.5",
    "FLUXSERVE_STALE_AFTER_SECONDS": "15",
    # Idle workers rely on the wake-ups (LISTEN/NOTIFY on PostgreSQL): a listener that does not come back
    # shows as a lone job's claim taking seconds.
    "FLUXSERVE_POLL_SECONDS": "5",
}


def client(base_url: str, key: str | None = None) -> httpx.Client:
    """A client whose calls count as hung past CLIENT_TIMEOUT; with ``key``, the reseller's key header."""
    headers = {"TT-API-KEY": key} if key else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=CLIENT_TIMEOUT)


@dataclass
class Answer:
    kind: str  # "submit" or "fetch"
    at: float  # time.time() when it was sent
    status: int | None  # None: no answer within CLIENT_TIMEOUT, or the connection failed
    body: Any = None
    retry_after: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Client threads that submit (each with its own Idempotency-Key, repeated after a 503) and fetch
    their job to its end, in a loop, until stopped; every answer is kept."""

    base_url: str
    key: str
    clients: int = 3
    answers: list[Answer] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    finished: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CLIENT_TIMEOUT * 2)

    def _call(self, kind: str, send: Callable[[], httpx.Response]) -> Answer:
        answer = Answer(kind, time.time(), None)
        try:
            response = send()
        except httpx.HTTPError as error:
            answer.error = repr(error)
        else:
            answer.status = response.status_code
            answer.body = response.json()
            answer.retry_after = response.headers.get("retry-after")
        self.answers.append(answer)
        return answer

    def _client(self, n: int) -> None:
        with client(self.base_url, self.key) as http:
            seed = 0
            while not self._stop.is_set():
                seed += 1
                idempotency = {"Idempotency-Key": uuid.uuid4().hex}
                body = {**BODY, "seed": n * 10_000 + seed}
                job_id = None
                while job_id is None and not self._stop.is_set():
                    send = partial(http.post, "/bfl/v1/flux-dev", json=body, headers=idempotency)
                    answer = self._call("submit", send)
                    if answer.status == 200:
                        job_id = answer.body["data"]["jobId"]
                    else:
                        self._stop.wait(float(answer.retry_after or 1))
                if job_id is None:
                    return
                self.accepted.add(job_id)
                self.follow(http, job_id)

    def follow(self, http: httpx.Client, job_id: str, deadline: float = 180) -> None:
        """Fetch the job until it ends (also after the load is stopped)."""
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            answer = self._call("fetch", lambda: http.get("/flux/fetch", params={"jobId": job_id}))
            if answer.status == 200 and answer.body["status"] in ("SUCCESS", "FAILED", "CONTENT_MODERATED"):
                self.finished[job_id] = answer.body["status"]
                return
            time.sleep(0.2)

    def wait_done(self, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while len(self.finished) < count:
            assert time.monotonic() < deadline, f"only {len(self.finished)} jobs finished"
            time.sleep(0.2)

    def finish_all(self) -> None:
        """After the stop: follow every accepted job that a client had not followed to its end."""
        with client(self.base_url, self.key) as http:
            for job_id in sorted(self.accepted - set(self.finished)):
                self.follow(http, job_id)


def log_events(server: ServerProcess) -> list[dict[str, Any]]:
    """The server's JSON log lines (API and worker processes write to the same file)."""
    events = []
    for line in server.log_path.read_text().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def assert_nothing_lost(load: Load, server: ServerProcess) -> None:
    """Every accepted job ended SUCCESS, and the worker ran each exactly once (one ``job started``, one
    recorded ``job finished`` in the log)."""
    assert load.accepted, "no job was accepted"
    assert set(load.finished) == load.accepted, sorted(load.accepted - set(load.finished))
    assert set(load.finished.values()) == {"SUCCESS"}, Counter(load.finished.values())
    events = log_events(server)
    started = Counter(e["job_id"] for e in events if e.get("event") == "job started")
    recorded = Counter(e["job_id"] for e in events if e.get("event") == "job finished" and e.get("recorded"))
    twice = {job_id: n for job_id, n in started.items() if n != 1}
    assert not twice, f"jobs run more than once: {twice}"
    assert all(recorded[job_id] == 1 for job_id in load.accepted), {j: recorded[j] for j in load.accepted}


def assert_answers_clear(load: Load) -> Counter[int | None]:
    """Every call was answered, with a 200 or (the database away) a 503 carrying Retry-After and the
    reseller's error shape; returns the count of each status."""
    statuses = Counter(answer.status for answer in load.answers)
    hangs = [answer for answer in load.answers if answer.status is None]
    assert not hangs, [answer.error for answer in hangs][:5]
    assert set(statuses) <= {200, 503}, statuses
    for answer in load.answers:
        if answer.status == 503:
            assert answer.retry_after is not None
            assert answer.body["status"] == "FAILED" and "database" in answer.body["message"], answer.body
    return statuses


def first_after(load: Load, kind: str, moment: float) -> float:
    """Seconds from ``moment`` (time.time()) to the first 200 of ``kind`` sent after it."""
    times = [a.at for a in load.answers if a.kind == kind and a.status == 200 and a.at >= moment]
    assert times, f"no {kind} succeeded after the part came back"
    return min(times) - moment


def first_event(server: ServerProcess, event: str, since: float, moment: float) -> str:
    """Seconds from ``moment`` to the first ``event`` logged after ``since`` (time.time() both), as text:
    negative when it came before ``moment`` (a part back before the test saw it), "never" when none."""
    times = [wall(e) for e in log_events(server) if e.get("event") == event and wall(e) >= since]
    return f"{min(times) - moment:.2f} s" if times else "never"


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, which it may restart and kill, durable as a production one
    is (a commit acknowledged before the SIGKILL survives it)."""
    own = PostgresCluster(required_binaries(), durable=True)
    try:
        own.start()
        yield own
    finally:
        own.stop()


def served(make_server: Callable[..., ServerProcess], env: dict[str, str]) -> tuple[ServerProcess, str]:
    """A server and a key, its worker process ready and idle (so listening for wake-ups)."""
    server = make_server({**ENV, **env})
    key = server.create_key("faults", credits="100000")["key"]
    server.start()
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.base_url}/readyz", timeout=CLIENT_TIMEOUT).status_code != 200:
        assert time.monotonic() < deadline, "the worker process did not become ready"
        time.sleep(0.2)
    time.sleep(1.0)
    return server, key


def lone_job(server: ServerProcess, key: str, load: Load) -> float:
    """Submit one job to the idle server and follow it to SUCCESS; returns the seconds from its accepted
    submit to its claim (an idle worker's wake-up)."""
    time.sleep(2.0)  # the worker has gone idle
    with client(server.base_url, key) as http:
        submitted = time.time()
        job_id = http.post("/bfl/v1/flux-dev", json=BODY).json()["data"]["jobId"]
        load.accepted.add(job_id)
        load.follow(http, job_id)
    assert load.finished[job_id] == "SUCCESS"
    (started,) = [
        wall(e) for e in log_events(server) if e.get("event") == "job started" and e["job_id"] == job_id
    ]
    return started - submitted


@pytest.mark.parametrize("fault", ["restart", "kill_postmaster"])
def test_postgres_restarted_under_load_loses_nothing(
    make_server, cluster: PostgresCluster, fault: str
) -> None:  # type: ignore[no-untyped-def]
    server, key = served(make_server, {"FLUXSERVE_DATABASE_URL": cluster.database()})
    with Load(server.base_url, key) as load:
        load.wait_done(3)
        away = time.time()
        getattr(cluster, fault)(down=3.0)  # away for the shutdown (or crash), 3 s, and the start
        back = time.time()
        time.sleep(10)  # the load goes on after the database's return
    load.finish_all()
    # The server recovered without a restart: a new job, submitted to the idle worker now, runs.
    wake = lone_job(server, key, load)
    assert_nothing_lost(load, server)
    statuses = assert_answers_clear(load)
    print(
        f"\nFAULTS postgres {fault}: away {back - away:.1f} s; jobs {len(load.accepted)}; answers "
        f"{dict(statuses)}; after the return: first API submit {first_after(load, 'submit', back):.2f} s, "
        f"first worker claim {first_event(server, 'job started', back, back)}, wake-up listener "
        f"reconnected {first_event(server, 'job wake-up listener reconnected', away, back)}; "
        f"a lone job's submit to claim afterwards {wake:.2f} s"
    )


def test_clients_get_503_in_their_dialect_while_the_database_is_away(
    make_server, cluster: PostgresCluster
) -> None:  # type: ignore[no-untyped-def]
    server, key = served(
        make_server, {"FLUXSERVE_DATABASE_URL": cluster.database(), "FLUXSERVE_WORKERS": "0"}
    )
    cluster.halt()
    try:
        with client(server.base_url) as http:
            reseller = http.get(
                "/flux/fetch", params={"jobId": str(uuid.uuid4())}, headers={"TT-API-KEY": key}
            )
            vendor = http.post("/v1/flux-dev", json=BODY, headers={"x-key": key})
            openai = http.post(
                "/v1/images/generations",
                json={"prompt": "p", "size": "256x256"},
                headers={"Authorization": f"Bearer {key}"},
            )
            ready = http.get("/readyz")
    finally:
        cluster.serve_again()
    for response in (reseller, vendor, openai):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "2"
    assert reseller.json() == {"status": "FAILED", "message": reseller.json()["message"], "data": None}
    assert "database" in reseller.json()["message"]
    assert "database" in vendor.json()["detail"]
    error = openai.json()["error"]
    assert error["type"] == "server_error" and "database" in error["message"]
    assert ready.status_code == 503 and ready.json()["failing"] == ["database"]
    # and the same server answers as soon as the database is back
    response = httpx.get(
        f"{server.base_url}/flux/fetch", params={"jobId": str(uuid.uuid4())}, headers={"TT-API-KEY": key}
    )
    assert response.status_code == 404, response.text


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[MotoProcess]:
    server = MotoProcess(tmp_path / "moto.log")
    yield server
    server.stop()


def test_s3_hung_for_30_s_loses_nothing_and_readyz_says_so(make_server, moto: MotoProcess) -> None:  # type: ignore[no-untyped-def]
    bucket = create_bucket(moto.endpoint)
    server, key = served(
        make_server,
        {**CREDENTIALS, "FLUXSERVE_STORAGE_URL": storage_url(bucket, "faults", server=moto.endpoint)},
    )
    readiness: list[tuple[float, int]] = []
    with (
        Load(server.base_url, key) as load,
        client(server.base_url) as http,
    ):
        load.wait_done(3)
        moto.pause()
        hung = time.time()
        while time.time() - hung < 30:
            started = time.time()
            readiness.append((started, http.get("/readyz").status_code))
            time.sleep(1.0)
        moto.resume()
        back = time.time()
        while time.time() - back < 15:
            readiness.append((time.time(), http.get("/readyz").status_code))
            time.sleep(0.5)
    load.finish_all()
    wake = lone_job(server, key, load)
    assert_nothing_lost(load, server)
    statuses = assert_answers_clear(load)
    assert set(statuses) == {200}, statuses  # the database never went: nothing for a client to be refused
    # every result is in the bucket and downloadable
    stored = {
        key.rsplit("/", 1)[-1].split(".")[0]
        for key in object_keys(bucket, "faults/results/", server=moto.endpoint)
    }
    assert load.accepted <= stored, sorted(load.accepted - stored)
    during = [status for at, status in readiness if hung + 6 < at < back]
    assert during and set(during) == {503}, readiness
    assert readiness[-1][1] == 200, readiness
    ready_again = min(at for at, status in readiness if at >= back and status == 200) - back
    print(
        f"\nFAULTS s3 hung 30 s: jobs {len(load.accepted)}; readyz 200 again after {ready_again:.2f} s; "
        f"API submit {first_after(load, 'submit', back):.2f} s; worker finish "
        f"{first_event(server, 'job finished', back, back)} after the return; a lone job's submit to "
        f"claim afterwards {wake:.2f} s"
    )


def test_s3_refusing_a_result_is_waited_for_not_a_failed_job(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """S3 stopped (connections refused) while a job finishes: the worker writes the result again until the
    store is back (here a new, empty moto on the same port: only this job's result is checked)."""
    first = MotoProcess(tmp_path / "moto.log")
    bucket = create_bucket(first.endpoint)
    url = storage_url(bucket, "faults", server=first.endpoint)
    server, key = served(make_server, {**CREDENTIALS, "FLUXSERVE_STORAGE_URL": url})
    first.stop()
    with client(server.base_url, key) as http:
        job_id = http.post("/bfl/v1/flux-dev", json=BODY).json()["data"]["jobId"]
        deadline = time.monotonic() + 120
        while not any(job_id in e.get("key", "") for e in log_events(server)):
            assert time.monotonic() < deadline, "the worker did not retry the result's write"
            time.sleep(0.5)
        ready = http.get("/readyz")
        second = MotoProcess(tmp_path / "moto2.log", port=first.port)
        try:
            create_bucket(second.endpoint, bucket)
            load = Load(server.base_url, key)
            load.accepted.add(job_id)
            load.follow(http, job_id)
            stored = object_keys(bucket, "faults/results/", server=second.endpoint)
        finally:
            second.stop()
    assert ready.status_code == 503 and ready.json()["failing"] == ["storage"], ready.text
    assert load.finished[job_id] == "SUCCESS"
    assert [k for k in stored if job_id in k], stored
    assert_nothing_lost(load, server)


def test_a_slow_statement_ends_at_its_timeout_as_the_database_away(postgres_url: str) -> None:
    """``statement_timeout`` reaches the server (a request cannot hold a connection for minutes), and
    its error is one the API answers with a 503, unlike an error of the statement itself."""
    database = open_database(postgres_url, Timeouts(statement=0.2))
    try:
        with pytest.raises(OperationalError) as slow, database.connect() as conn:
            conn.execute(text("SELECT pg_sleep(5)"))
        assert "statement timeout" in str(slow.value) and database_away(slow.value)
        with pytest.raises(ProgrammingError) as wrong, database.connect() as conn:
            conn.execute(text("SELECT * FROM no_such_table"))
        assert not database_away(wrong.value)
    finally:
        database.dispose()
