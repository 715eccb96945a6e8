"""Event streams in process: the app without workers, its job row moved by the store as a worker moves it
(claim, progress, finish) from another thread while the stream reads the database."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import event, text

from fluxserve.api.deps import Services
from fluxserve.api.events import EventId, EventStreams
from fluxserve.app import create_app
from fluxserve.core.job import JobStatus
from fluxserve.jobs.store import Claims
from fluxserve.settings import Settings

WORKER = "worker-1"


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def app_client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Services]]:
    """On asyncio's loop and on uvloop's, which ``fluxserve serve`` runs: their handles differ (uvloop's
    ``call_later`` of under a millisecond gives a plain Handle, without ``when``)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("events"),
        workers=0,
        events_position_seconds=0.05,
        events_max_per_key=2,
        events_idle_seconds=10,
    )
    app = create_app(settings)
    with TestClient(app, backend_options={"use_uvloop": request.param == "uvloop"}) as client:
        yield client, app.state.services


@pytest.fixture
def key(app_client: tuple[TestClient, Services]) -> str:
    services = app_client[1]
    return services.keys.create(f"k{services.keys.count()}", Decimal(100)).key


def parse(text: str) -> list[dict[str, Any]]:
    """The events of an SSE body, comments (pings) left out."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            events.append({"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def submit(client: TestClient, key: str) -> str:
    response = client.post("/bfl/v1/flux-dev", json={"prompt": "a red heart"}, headers={"TT-API-KEY": key})
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["jobId"])


def claims(client: TestClient) -> Claims:
    """The app's store in a worker's role: these tests play the worker."""
    return cast(Claims, client.app.state.runtime.stores.claims)  # type: ignore[attr-defined]


def drain(client: TestClient) -> None:
    """End every queued job (earlier tests' too), so that a test's own job is next in line and the only
    one a requeue puts back."""
    while (job := claims(client).claim("drain")) is not None:
        claims(client).finish(job.id, "drain", JobStatus.CANCELED)


def follow(
    client: TestClient,
    url: str,
    params: dict[str, str],
    headers: dict[str, str],
    *steps: Callable[[], object],
    pinged: Callable[[], object] = lambda: None,
) -> tuple[Response, str]:
    """Stream ``url`` and make the next of ``steps`` (a change of the job) each time the stream has
    delivered an event: every change waits for the event of the state before it, never for a pause, so no
    two changes can fold into one event however slow the machine; ``pinged`` is called on each keep-alive
    comment. Returns the response and its body."""
    pending = iter(steps)
    lines: list[str] = []
    with client.stream("GET", url, params=params, headers=headers) as response:
        event_open = False
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith(":"):
                pinged()
            event_open = event_open or line.startswith("event: ")
            if not line and event_open:  # the blank line that ends an event: it has been delivered
                event_open = False
                if (step := next(pending, None)) is not None:
                    step()
    assert next(pending, None) is None, "the stream ended before every change was made"
    return response, "\n".join(lines)


def test_reseller_stream_follows_the_job_from_queue_to_result(
    app_client: tuple[TestClient, Services],
) -> None:
    client, services = app_client
    key = services.keys.create("life", Decimal(100)).key
    drain(client)
    first, second = submit(client, key), submit(client, key)
    assert (
        client.get("/flux/fetch", params={"jobId": second}, headers={"TT-API-KEY": key}).json()["data"][
            "queuePosition"
        ]
        == 1
    )

    def finish() -> None:
        claims(client).finish(second, WORKER, JobStatus.SUCCEEDED, result_key="results/x.png")

    response, body = follow(
        client,
        "/flux/events",
        {"jobId": second},
        {"TT-API-KEY": key},
        lambda: client.post("/flux/cancel", json={"jobId": first}, headers={"TT-API-KEY": key}),
        lambda: claims(client).claim(WORKER),
        lambda: claims(client).heartbeat(second, WORKER, 0.5),
        finish,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse(body)
    assert [(event["event"], event["data"]) for event in events[:-1]] == [
        ("queued", {"position": 1}),
        ("queued", {"position": 0}),
        ("running", {"progress": 0.0}),
        ("running", {"progress": 0.5}),
    ]
    result = events[-1]
    assert result["event"] == "result"
    assert result["data"]["status"] == "SUCCESS"
    assert result["data"]["data"]["jobId"] == second
    assert result["data"]["data"]["imageUrl"].startswith(services.base_url + "/files/")
    ids = [EventId.parse(event["id"]) for event in events]
    assert all(ids) and ids == sorted(ids) and len(set(ids)) == len(ids)

    # Reconnecting after the last running event: only the result, once; after the result: 204, no body.
    resumed = client.get(
        "/flux/events",
        params={"jobId": second},
        headers={"TT-API-KEY": key, "Last-Event-ID": events[3]["id"]},
    )
    assert [event["event"] for event in parse(resumed.text)] == ["result"]
    done = client.get(
        "/flux/events", params={"jobId": second}, headers={"TT-API-KEY": key, "Last-Event-ID": result["id"]}
    )
    assert (done.status_code, done.content) == (204, b"")


def test_vendor_stream_ends_with_get_result_and_a_requeued_job_keeps_ids_growing(
    app_client: tuple[TestClient, Services], key: str
) -> None:
    client, _ = app_client
    drain(client)
    response = client.post("/v1/flux-dev", json={"prompt": "a cat"}, headers={"x-key": key})
    job_id = response.json()["id"]
    pending = client.get("/v1/get_result", params={"id": job_id}, headers={"x-key": key}).json()
    assert pending["details"] == {"queue_position": 0}

    def crash() -> None:  # the worker stops heartbeating: its job goes back to the queue
        claims(client).requeue_stale(datetime.now(UTC) + timedelta(seconds=1), max_attempts=3)

    _, body = follow(
        client,
        "/v1/events",
        {"id": job_id},
        {"x-key": key},
        lambda: claims(client).claim(WORKER),
        lambda: claims(client).heartbeat(job_id, WORKER, 0.25),
        crash,
        lambda: claims(client).claim("worker-2"),
        lambda: claims(client).finish(job_id, "worker-2", JobStatus.FAILED, error="engine broke"),
    )
    events = parse(body)
    assert [event["event"] for event in events] == [
        "queued", "running", "running", "queued", "running", "result",
    ]  # fmt: skip
    assert events[-1]["data"] == {
        "id": job_id, "status": "Error", "result": None, "progress": None,
        "details": {"error": "engine broke"}, "preview": None,
    }  # fmt: skip
    ids = [EventId.parse(event["id"]) for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_streams_refuse_unknown_jobs_other_keys_and_missing_keys(
    app_client: tuple[TestClient, Services], key: str
) -> None:
    client, services = app_client
    job_id = submit(client, key)
    other = services.keys.create("other", Decimal(1)).key
    missing = client.get("/flux/events", params={"jobId": job_id})
    assert missing.status_code == 401
    assert missing.json()["message"] == "TT-API-KEY header is missing; send your API key in it"
    foreign = client.get("/flux/events", params={"jobId": job_id}, headers={"TT-API-KEY": other})
    assert (foreign.status_code, foreign.json()["status"]) == (404, "FAILED")
    no_id = client.get("/flux/events", headers={"TT-API-KEY": key})
    assert (no_id.status_code, no_id.json()["message"]) == (400, "jobId: is required")
    vendor = client.get("/v1/events", params={"id": job_id}, headers={"x-key": other})
    assert (vendor.status_code, vendor.json()) == (404, {"detail": "Task not found"})
    assert client.get("/v1/events", params={"id": job_id}).status_code == 403


def test_open_streams_are_bounded_per_key_and_idle_streams_end(
    app_client: tuple[TestClient, Services], key: str
) -> None:
    client, services = app_client
    streams: EventStreams = client.app.state.event_streams  # type: ignore[attr-defined]
    job_id = submit(client, key)
    headers = {"TT-API-KEY": key}
    idle = streams.idle_seconds
    streams.idle_seconds = 0.3
    try:
        started = time.monotonic()
        quiet = client.get("/flux/events", params={"jobId": job_id}, headers=headers)
        assert [event["event"] for event in parse(quiet.text)] == ["queued"]  # then nothing new: it ended
        assert 0.3 <= time.monotonic() - started < 5
        assert not streams.open  # its slot was given back

        streams.open[services.keys.authenticate(key).id] = streams.max_per_key  # type: ignore[union-attr]
        refused = client.get("/flux/events", params={"jobId": job_id}, headers=headers)
        assert (refused.status_code, refused.json()["message"]) == (
            429, "Too many open event streams for this key (at most 2)",
        )  # fmt: skip
        vendor = client.get("/v1/events", params={"id": job_id}, headers={"x-key": key})
        assert vendor.status_code == 429 and "at most 2" in vendor.json()["detail"]
    finally:
        streams.idle_seconds = idle
        streams.open.clear()


def test_event_ids_order_rounds_before_stages_and_ignore_foreign_last_event_ids() -> None:
    assert EventId.parse("1.1.10000") < EventId.parse("2.0.0") < EventId.parse("2.2.0")  # type: ignore[operator]
    for foreign in (None, "", "abc", "1.2", "1.-2.3", "1.2.3.4", "9" * 20 + ".0.0"):
        assert EventId.parse(foreign) is None


def test_idle_streams_read_nothing_until_their_job_changes(
    app_client: tuple[TestClient, Services], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six streams on a queued job and two on a running one, neither moving: no statement reads either
    while every stream sends keep-alive pings (its loop is awake). When the first job changes, the one
    watcher reads it once per change for all six; the other stays unread."""
    client, services = app_client
    monkeypatch.setattr("fluxserve.api.events.PING_SECONDS", 0.25)
    streams: EventStreams = client.app.state.event_streams  # type: ignore[attr-defined]
    database = client.app.state.runtime.database  # type: ignore[attr-defined]
    published: set[str] = set()  # the jobs whose changes the feed has handed to its subscribers
    fed = threading.Condition()

    def publish(changes: Any) -> None:
        with fed:
            published.update(change.job_id for change in changes or ())
            fed.notify_all()

    client.app.state.runtime.feed.subscribe(publish)  # type: ignore[attr-defined]
    drain(client)
    keys = [services.keys.create(f"idle-{index}", Decimal(10)).key for index in range(2)]
    still = submit(client, keys[1])
    assert claims(client).claim("busy-worker") is not None  # running, and stays at its progress
    moving = submit(client, keys[0])
    with fed:  # the feed has published every change so far (in order): none reaches the streams late
        assert fed.wait_for(lambda: moving in published, 30), "the feed never published the submit"
    reads: dict[str, list[str]] = {moving: [], still: []}

    def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        for job_id, seen in reads.items():
            if job_id in repr(parameters) and statement.lstrip().upper().startswith("SELECT"):
                seen.append(statement)

    bodies: dict[str, list[str]] = {moving: [], still: []}
    first_events = threading.Semaphore(0)  # released once per stream that has delivered its first event
    pings = [0] * 8  # each stream's keep-alive comments so far
    pinged = threading.Condition()

    def stream(index: int, job_id: str, key: str) -> None:
        def ping() -> None:
            with pinged:
                pings[index] += 1
                pinged.notify_all()

        _, body = follow(
            client, "/flux/events", {"jobId": job_id}, {"TT-API-KEY": key}, first_events.release, pinged=ping
        )
        bodies[job_id].append(body)

    def pings_more(more: int) -> None:
        """Wait until every stream has sent ``more`` keep-alive pings from now."""
        with pinged:
            since = list(pings)
            assert pinged.wait_for(lambda: all(n >= m + more for n, m in zip(pings, since, strict=True)), 30)

    idle, per_key = streams.idle_seconds, streams.max_per_key
    streams.idle_seconds, streams.max_per_key = 4, 8
    threads = [
        threading.Thread(target=stream, args=(index, *((moving, keys[0]) if index < 6 else (still, keys[1]))))
        for index in range(8)
    ]
    try:
        for thread in threads:
            thread.start()
        for _ in threads:  # every stream has read and sent its first event: from here on they are idle
            assert first_events.acquire(timeout=30), "a stream sent no first event"
        pings_more(1)  # the read the last stream's opening asked for, if still under way, has ended
        event.listen(database, "before_cursor_execute", count)
        try:
            pings_more(2)  # half a second, ten position intervals, in which every stream is awake
            assert reads == {moving: [], still: []}, "an idle stream read its job"
            claims(client).claim(WORKER)  # the first job changes twice
            claims(client).finish(moving, WORKER, JobStatus.SUCCEEDED, result_key="results/x.png")
            for thread in threads:
                thread.join(30)
        finally:
            event.remove(database, "before_cursor_execute", count)
    finally:
        streams.idle_seconds, streams.max_per_key = idle, per_key
    assert [parse(body)[-1]["event"] for body in bodies[moving]] == ["result"] * 6
    assert [[e["event"] for e in parse(body)] for body in bodies[still]] == [["running"]] * 2  # then idle
    assert 1 <= len(reads[moving]) <= 2, reads[moving]  # once per change (or both at once), not per stream
    assert reads[still] == []


def test_open_streams_are_bounded_per_process_across_keys(
    app_client: tuple[TestClient, Services], key: str
) -> None:
    client, _ = app_client
    streams: EventStreams = client.app.state.event_streams  # type: ignore[attr-defined]
    job_id = submit(client, key)
    total = streams.total
    streams.total = streams.max_per_process  # as if other keys held every slot
    try:
        refused = client.get("/flux/events", params={"jobId": job_id}, headers={"TT-API-KEY": key})
        assert (refused.status_code, refused.json()["message"]) == (
            429, f"Too many open event streams on this server (at most {streams.max_per_process}); try "
            "again later",
        )  # fmt: skip
        vendor = client.get("/v1/events", params={"id": job_id}, headers={"x-key": key})
        assert vendor.status_code == 429 and "on this server" in vendor.json()["detail"]
        assert not streams.open  # a refused stream holds no slot
    finally:
        streams.total = total


@pytest.mark.postgres
def test_a_change_in_the_listeners_gap_still_reaches_the_stream(postgres_url: str, tmp_path: Path) -> None:
    """The feed's LISTEN connection is cut; the job ends before it listens again (its NOTIFY is lost):
    on reconnecting, the watcher reads every streamed job again, and the stream gets the result."""
    settings = Settings(data_dir=tmp_path, workers=0, database_url=postgres_url, events_idle_seconds=60)
    app = create_app(settings)
    runtime = app.state.runtime
    with TestClient(app) as client:
        services: Services = app.state.services
        key = services.keys.create("gap", Decimal(10)).key
        job_id = submit(client, key)
        assert runtime.stores.claims.claim(WORKER) is not None
        bodies: list[str] = []
        running_sent = threading.Event()
        thread = threading.Thread(
            target=lambda: bodies.append(
                follow(client, "/flux/events", {"jobId": job_id}, {"TT-API-KEY": key}, running_sent.set)[1]
            )
        )
        thread.start()
        assert runtime.feed.ready(30)
        assert running_sent.wait(30), "the stream sent no first event"
        deadline = time.monotonic() + 30
        with runtime.database.begin() as conn:
            killed = conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
            ).all()
        assert killed == [(True,)]
        while runtime.feed._ready.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime.stores.claims.finish(job_id, WORKER, JobStatus.SUCCEEDED, result_key="results/x.png")
        assert not runtime.feed._ready.is_set(), "the feed listened again before the change: no gap"
        thread.join(30)
    assert [event["event"] for event in parse(bodies[0])] == ["running", "result"]


PREVIEW_IMAGE = "data:image/jpeg;base64,/9j/4AAQ"


def test_a_live_preview_is_one_preview_event_in_both_streams_and_shows_in_fetch_while_running(
    app_client: tuple[TestClient, Services],
) -> None:
    client, services = app_client
    key = services.keys.create("previews", Decimal(100)).key
    drain(client)
    job_id = submit(client, key)
    preview = {"image": PREVIEW_IMAGE, "progress": 0.3}
    seen: dict[str, Any] = {}

    def write_preview() -> None:
        claims(client).update_running(job_id, WORKER, details={"preview": preview}, progress=0.3)
        seen["fetch"] = client.get("/flux/fetch", params={"jobId": job_id}, headers={"TT-API-KEY": key})
        seen["result"] = client.get("/v1/get_result", params={"id": job_id}, headers={"x-key": key})

    def finish() -> None:
        claims(client).finish(job_id, WORKER, JobStatus.SUCCEEDED, result_key="results/x.png", details={})

    _, body = follow(
        client,
        "/flux/events",
        {"jobId": job_id},
        {"TT-API-KEY": key},
        lambda: claims(client).claim(WORKER),
        write_preview,
        lambda: None,
        lambda: claims(client).heartbeat(job_id, WORKER, 0.6),
        finish,
    )
    events = [(event["event"], event["data"]) for event in parse(body)]
    assert events[1:5] == [
        ("running", {"progress": 0.0}),
        ("running", {"progress": 0.3}),
        ("preview", preview),
        ("running", {"progress": 0.6}),  # progress moved on without a new preview: not sent again
    ]
    assert events[-1][0] == "result" and "previewUrl" not in events[-1][1]["data"]
    assert seen["fetch"].json()["data"]["previewUrl"] == PREVIEW_IMAGE
    assert seen["result"].json()["preview"] == {"sample": PREVIEW_IMAGE, "progress": 0.3}
    vendor = client.get("/v1/events", params={"id": job_id}, headers={"x-key": key})
    assert [event["event"] for event in parse(vendor.text)] == ["result"]  # ended: no preview
    assert (
        client.get("/v1/get_result", params={"id": job_id}, headers={"x-key": key}).json()["preview"] is None
    )


def test_the_vendor_stream_sends_the_preview_of_a_running_task(
    app_client: tuple[TestClient, Services],
) -> None:
    client, services = app_client
    key = services.keys.create("vendor-previews", Decimal(100)).key
    drain(client)
    job_id = submit(client, key)
    claims(client).claim(WORKER)
    preview = {"image": PREVIEW_IMAGE, "progress": 0.5}
    claims(client).update_running(job_id, WORKER, details={"preview": preview}, progress=0.5)
    _, body = follow(
        client,
        "/v1/events",
        {"id": job_id},
        {"x-key": key},
        lambda: None,
        lambda: claims(client).finish(job_id, WORKER, JobStatus.FAILED, error="stopped"),
    )
    assert [(event["event"], event["data"]) for event in parse(body)][:2] == [
        ("running", {"progress": 0.5}),
        ("preview", preview),
    ]
