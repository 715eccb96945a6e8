"""Live progress of one job as Server-Sent Events, in each dialect's terms.

- ``GET /flux/events?jobId=`` with ``TT-API-KEY`` (reseller), ``GET /v1/events?id=`` with ``x-key`` (vendor).
- Events: ``queued`` ``{"position": n}`` (queued jobs created before it), ``running`` ``{"progress": 0..1}``,
  and ``result``, the dialect's fetch JSON (``/flux/fetch`` or ``/v1/get_result``); then the stream ends.

The stream reads the job's row, not this process's memory, so any API replica serves any job: it reads
the row again when the database changed (a wake-up on SQLite, ``jobs/changes.py``), at least every
``events_poll_seconds``, and sends an event only when what the client would see has moved on.
Each event id says where in the job's life it was sent (:class:`EventId`); they only grow, so a client
that reconnects with ``Last-Event-ID`` gets only what is newer, and one that already had the result gets
204 (which tells an ``EventSource`` to stop reconnecting). Streams are bounded per key and process
(``events_max_per_key``, beyond it 429) and end after ``events_idle_seconds`` without an event (the client
reconnects to carry on); a comment line every 15 s keeps proxies from closing a quiet one.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from fluxserve.accounts.keys import ApiKey
from fluxserve.api import reseller, vendor
from fluxserve.api.auth import reseller_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import ApiError
from fluxserve.core.job import Job, JobStatus
from fluxserve.core.numbers import ascii_int
from fluxserve.jobs.changes import DatabaseChanges

router = APIRouter(tags=["events"])

PING_SECONDS = 15
QUEUED, RUNNING, RESULT = 0, 1, 2  # stages of a job's life, in the order a client sees them
MAX_POSITION = 10**9
PROGRESS_SCALE = 10_000  # progress is stored rounded to 4 decimals


@dataclass(frozen=True, order=True)
class EventId:
    """``<round>.<stage>.<value>``, ordered as a tuple. ``round`` counts claims (a job a crashed worker
    gave back is queued again in the next round), ``stage`` is queued/running/result, and ``value`` grows
    within a stage (positions count down, progress up)."""

    round: int
    stage: int
    value: int

    def __str__(self) -> str:
        return f"{self.round}.{self.stage}.{self.value}"

    @classmethod
    def parse(cls, text: str | None) -> EventId | None:
        """A ``Last-Event-ID``; anything that is not one of ours reads as none (start from now)."""
        numbers = [ascii_int(part, 12) for part in (text or "").strip().split(".")]
        if len(numbers) != 3 or None in numbers:
            return None
        return cls(*(number for number in numbers if number is not None))


@dataclass(frozen=True)
class Snapshot:
    """What a client should see of the job now: the event it would be sent."""

    id: EventId
    event: str
    data: dict[str, Any]

    @property
    def final(self) -> bool:
        return self.id.stage == RESULT


Render = Callable[[Job, Services], dict[str, Any]]


def final_id(job: Job) -> EventId:
    """The id of a job's ``result`` event: after every event of every round before it."""
    return EventId(job.attempts + 1, RESULT, 0)


def snapshot(job: Job, position: int | None, render: Render, services: Services) -> Snapshot | None:
    """The job's event now. None while it waits without a place in the queue: still fetching its URL
    inputs, or claimed between the two reads (``position`` is None but for a queued job)."""
    if job.status.is_terminal:
        return Snapshot(final_id(job), "result", render(job, services))
    if job.status is JobStatus.RUNNING:
        value = round(job.progress * PROGRESS_SCALE)
        return Snapshot(EventId(job.attempts, RUNNING, value), "running", {"progress": job.progress})
    if position is None:
        return None
    ahead = min(position, MAX_POSITION)
    return Snapshot(EventId(job.attempts + 1, QUEUED, MAX_POSITION - ahead), "queued", {"position": ahead})


@dataclass
class EventStreams:
    """This process's open streams per key, how streams wait for changes (a wake-up where the database
    has one, else every ``poll_seconds``) and when they time out (from settings)."""

    max_per_key: int
    poll_seconds: float
    idle_seconds: float
    changes: DatabaseChanges
    open: Counter[str] = field(default_factory=Counter)

    def acquire(self, key_id: str) -> bool:
        if self.open[key_id] >= self.max_per_key:
            return False
        self.open[key_id] += 1
        return True

    def release(self, key_id: str) -> None:
        self.open[key_id] -= 1
        if self.open[key_id] <= 0:
            del self.open[key_id]


def get_streams(request: Request) -> EventStreams:
    return cast(EventStreams, request.app.state.event_streams)


class _CountedStream(EventSourceResponse):
    """An event stream that gives its key's slot back however it ends (done, idle, client gone)."""

    def __init__(self, content: AsyncIterator[ServerSentEvent], release: Callable[[], None]) -> None:
        super().__init__(content, ping=PING_SECONDS)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _events(
    job_id: str, key_id: str, last: EventId | None, render: Render, services: Services, streams: EventStreams
) -> AsyncIterator[ServerSentEvent]:
    def look() -> tuple[bool, Snapshot | None]:
        """(whether the job is still there, its event now), read in a thread: two small queries."""
        job = services.jobs.get(job_id, key_id=key_id)
        if job is None:
            return False, None
        position = services.jobs.queue_position(job.id) if job.status is JobStatus.QUEUED else None
        return True, snapshot(job, position, render, services)

    quiet_since = time.monotonic()
    while True:
        exists, now = await anyio.to_thread.run_sync(look)
        if not exists:  # jobs are not deleted, but a stream must not outlive its row
            return
        if now is not None and (last is None or now.id > last):
            last = now.id
            quiet_since = time.monotonic()
            yield ServerSentEvent(json.dumps(now.data), event=now.event, id=str(now.id))
            if now.final:
                return
        elif time.monotonic() - quiet_since >= streams.idle_seconds:
            return
        idle_left = streams.idle_seconds - (time.monotonic() - quiet_since)
        await streams.changes.wait(max(min(streams.poll_seconds, idle_left), 0.0))


def _stream(
    job: Job,
    key: ApiKey,
    last_event_id: str | None,
    render: Render,
    services: Services,
    streams: EventStreams,
    refuse: Callable[[int, str], Exception],
) -> Response:
    last = EventId.parse(last_event_id)
    if job.status.is_terminal and last is not None and last >= final_id(job):
        return Response(status_code=204)  # the client has the result: no more reconnects
    if not streams.acquire(key.id):
        raise refuse(429, f"Too many open event streams for this key (at most {streams.max_per_key})")
    return _CountedStream(
        _events(job.id, key.id, last, render, services, streams), lambda: streams.release(key.id)
    )


Deps = Annotated[Services, Depends(get_services)]
Streams = Annotated[EventStreams, Depends(get_streams)]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]


def _render_vendor(job: Job, services: Services) -> dict[str, Any]:
    return vendor.render_result(job, job.id, services).model_dump(mode="json")


@router.get("/flux/events", summary="A job's progress as Server-Sent Events, ending with its fetch JSON")
async def reseller_events(
    key: Annotated[ApiKey, Depends(reseller_key)],
    services: Deps,
    streams: Streams,
    job_id: Annotated[str | None, Query(alias="jobId", max_length=100, description="The job's id.")] = None,
    last_event_id: LastEventId = None,
) -> Response:
    if not job_id:
        raise ApiError(400, "jobId: is required")
    job = await anyio.to_thread.run_sync(lambda: services.jobs.get(job_id.strip(), key_id=key.id))
    if job is None:
        raise ApiError(404, f"jobId: no job {job_id!r} for this key")
    return _stream(job, key, last_event_id, reseller.render_job, services, streams, ApiError)


@router.get("/v1/events", summary="A task's progress as Server-Sent Events, ending with its get_result JSON")
async def vendor_events(
    key: Annotated[ApiKey, Depends(vendor.vendor_key)],
    services: Deps,
    streams: Streams,
    task_id: Annotated[str, Query(alias="id", min_length=1, max_length=100, description="The task's id.")],
    last_event_id: LastEventId = None,
) -> Response:
    job = await anyio.to_thread.run_sync(lambda: services.jobs.get(task_id.strip(), key_id=key.id))
    if job is None:
        raise HTTPException(404, "Task not found")
    return _stream(job, key, last_event_id, _render_vendor, services, streams, HTTPException)
