"""Live progress of one job as Server-Sent Events, in the terms of the stream's surface.

- ``GET /flux/events?jobId=`` with ``TT-API-KEY`` (reseller), ``GET /v1/events?id=`` with ``x-key`` (vendor).
- Events: ``queued`` ``{"position": n}`` (queued jobs created before it), ``running`` ``{"progress": 0..1}``,
  with live previews on (``FLUXSERVE_PREVIEWS``) a ``preview`` ``{"progress": p, "image": <JPEG data URI>}``
  after the ``running`` event of each new preview, and ``result``, the surface's fetch JSON
  (``/flux/fetch`` or ``/v1/get_result``); then the stream ends.

The stream follows the job's row, not this process's memory, so any API replica serves any job: the
process's change feed (``jobs/feed.py``) says when the row changed, one watcher per process
(:class:`EventStreams`) reads it once for all of its streams, and a stream sends an event only when what
the client would see has moved on. Nothing is read for a job that does not change.
Each event id says where in the job's life it was sent (:class:`EventId`); they only grow, so a client
that reconnects with ``Last-Event-ID`` gets only what is newer, and one that already had the result gets
204 (which tells an ``EventSource`` to stop reconnecting). Streams are bounded per key and process
(``events_max_per_key``) and per process across keys (``events_max_per_process``), beyond either 429,
and end after ``events_idle_seconds`` without an event (the client reconnects to carry on); a comment
line every 15 s keeps proxies from closing a quiet one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import reseller_key, vendor_key
from fluxserve.api.deps import Services, get_services
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.notes import preview_of
from fluxserve.core.numbers import ascii_int
from fluxserve.errors import Refused
from fluxserve.jobs.feed import JobChange
from fluxserve.surfaces import for_path

router = APIRouter(tags=["events"])
log = logging.getLogger("fluxserve.events")

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
    preview: dict[str, Any] | None = None  # a running job's live preview: a ``preview`` event when new

    @property
    def final(self) -> bool:
        return self.id.stage == RESULT


Render = Callable[[JobRecord, Services], dict[str, Any]]


def final_id(job: JobRecord) -> EventId:
    """The id of a job's ``result`` event: after every event of every round before it."""
    return EventId(job.attempts + 1, RESULT, 0)


def snapshot(job: JobRecord, position: int | None, render: Render, services: Services) -> Snapshot | None:
    """The job's event now. None while it waits without a place in the queue: still fetching its URL
    inputs, or claimed between the two reads (``position`` is None but for a queued job)."""
    if job.status.is_terminal:
        return Snapshot(final_id(job), "result", render(job, services))
    if job.status is JobStatus.RUNNING:
        value = round(job.progress * PROGRESS_SCALE)
        running = {"progress": job.progress}
        return Snapshot(EventId(job.attempts, RUNNING, value), "running", running, preview_of(job.details))
    if position is None:
        return None
    ahead = min(position, MAX_POSITION)
    return Snapshot(EventId(job.attempts + 1, QUEUED, MAX_POSITION - ahead), "queued", {"position": ahead})


@dataclass(eq=False)
class _Stream:
    """One open stream's mailbox: the newest event of its job (set by the watcher), and a flag to wake it."""

    render: Render
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    latest: Snapshot | None = None
    gone: bool = False  # the job's row is gone: the stream ends


class EventStreams:
    """This process's open streams and the one watcher that feeds them.

    The change feed (``jobs/feed.py``) says which jobs changed; the watcher reads each changed job that has
    streams once (and, while streamed jobs wait in the queue, their positions, at most every
    ``position_seconds`` while other jobs move), renders its event once per surface and hands it to that
    job's streams. A stream of a job that does not change costs nothing but its socket. Streams are bounded
    per key and per process (429 beyond either)."""

    def __init__(
        self,
        services: Services,
        *,
        max_per_key: int,
        max_per_process: int,
        idle_seconds: float,
        position_seconds: float,
    ) -> None:
        self.services = services
        self.max_per_key = max_per_key
        self.max_per_process = max_per_process
        self.idle_seconds = idle_seconds
        self.position_seconds = position_seconds
        self.open: Counter[str] = Counter()
        self.total = 0
        self._watched: dict[str, set[_Stream]] = {}
        self._queued: set[str] = set()  # watched jobs last read as queued: their positions move
        self._dirty: set[str] = set()  # watched jobs to read
        self._others_moved = False  # some job changed: the queued ones' positions may have moved
        self._waits: dict[str, set[asyncio.Event]] = {}  # synchronous waits (OpenAI images) per job
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def acquire(self, key_id: str) -> str | None:
        """Take a slot for ``key_id``'s stream; else why not (the message of a 429)."""
        if self.open[key_id] >= self.max_per_key:
            return f"Too many open event streams for this key (at most {self.max_per_key})"
        if self.total >= self.max_per_process:
            return (
                f"Too many open event streams on this server (at most {self.max_per_process}); try again "
                "later"
            )
        self.open[key_id] += 1
        self.total += 1
        return None

    def release(self, key_id: str) -> None:
        self.total -= 1
        self.open[key_id] -= 1
        if self.open[key_id] <= 0:
            del self.open[key_id]

    def start(self) -> None:
        """Bind to the running event loop and start the watcher (again, on a new loop)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._task is None or self._task.done():
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._keep_watching())
            self._dirty.update(self._watched)
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def on_changes(self, changes: Sequence[JobChange] | None) -> None:
        """The feed's subscriber (called on its thread): hand the batch to the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._changed, changes)

    def _changed(self, changes: Sequence[JobChange] | None) -> None:
        ids = set(self._watched) | set(self._waits) if changes is None else {c.job_id for c in changes}
        for job_id in ids:
            for event in self._waits.get(job_id, ()):
                event.set()
        self._dirty.update(job_id for job_id in ids if job_id in self._watched)
        if self._queued:
            self._others_moved = True
        if self._dirty or self._others_moved:
            self._wake.set()

    @contextmanager
    def waiting(self, job_ids: Collection[str]) -> Iterator[asyncio.Event]:
        """An event set whenever one of ``job_ids`` changes, for a synchronous wait (enter it before
        reading the jobs, so that no change in between is missed)."""
        self.start()
        event = asyncio.Event()
        job_ids = tuple(job_ids)  # the caller's collection may shrink as jobs end
        for job_id in job_ids:
            self._waits.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            for job_id in job_ids:
                events = self._waits.get(job_id, set())
                events.discard(event)
                if not events:
                    self._waits.pop(job_id, None)

    def watch(self, job_id: str, render: Render) -> _Stream:
        """A mailbox for a new stream of ``job_id``; the watcher reads the job for it at once."""
        self.start()
        stream = _Stream(render)
        self._watched.setdefault(job_id, set()).add(stream)
        self._dirty.add(job_id)
        self._wake.set()
        return stream

    def unwatch(self, job_id: str, stream: _Stream) -> None:
        streams = self._watched.get(job_id, set())
        streams.discard(stream)
        if not streams:
            self._watched.pop(job_id, None)
            self._queued.discard(job_id)

    async def _keep_watching(self) -> None:
        """:meth:`_watch`, started again should it ever fail: without it every stream of the process would
        wait for events that never come."""
        while True:
            try:
                await self._watch()
            except Exception:
                log.exception("event streams: the watcher failed; starting it again")
                self._dirty.update(self._watched)  # what it may have missed is read again
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _watch(self) -> None:
        positions_read = 0.0
        # When the wake-up for the next read of positions is due (monotonic): one at a time. Kept here, not
        # asked of the timer handle: uvloop hands back a plain Handle (no ``when``) for a short delay.
        later_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._others_moved:  # a busy queue's moves fold into one read per position_seconds
                due = positions_read + self.position_seconds - time.monotonic()
                if due <= 0:
                    self._others_moved = False
                    positions_read = time.monotonic()
                    self._dirty.update(self._queued)
                elif later_at <= time.monotonic():
                    later_at = time.monotonic() + due
                    loop.call_later(due, self._wake.set)
            ids = [job_id for job_id in self._dirty if job_id in self._watched]
            self._dirty.clear()
            if not ids:
                continue
            try:
                looks = await anyio.to_thread.run_sync(self._look, ids)
            except Exception:  # the database is away: read them again in a moment
                log.exception("event streams: reading changed jobs failed")
                self._dirty.update(ids)
                await asyncio.sleep(1.0)
                self._wake.set()
                continue
            for job_id, (job, position) in looks.items():
                try:
                    self._deliver(job_id, job, position)
                except Exception:  # a job that cannot be rendered holds up no other job's streams
                    log.exception("event streams: rendering a job failed", extra={"job_id": job_id})

    def _look(self, job_ids: list[str]) -> dict[str, tuple[JobRecord | None, int | None]]:
        """Each job, and its queue position when queued (in a thread)."""
        looks: dict[str, tuple[JobRecord | None, int | None]] = {}
        for job_id in job_ids:
            job = self.services.jobs.get(job_id)
            queued = job is not None and job.status is JobStatus.QUEUED
            looks[job_id] = (job, self.services.jobs.queue_position(job_id) if queued else None)
        return looks

    def _deliver(self, job_id: str, job: JobRecord | None, position: int | None) -> None:
        """The job's event, rendered once per surface, to each of its streams."""
        streams = self._watched.get(job_id, set())
        if job is not None and job.status is JobStatus.QUEUED:
            self._queued.add(job_id)
        else:
            self._queued.discard(job_id)
        rendered: dict[Render, Snapshot | None] = {}
        for stream in streams:
            if job is None:
                stream.gone = True
            else:
                if stream.render not in rendered:
                    rendered[stream.render] = snapshot(job, position, stream.render, self.services)
                stream.latest = rendered[stream.render]
            stream.ready.set()


def get_streams(request: Request) -> EventStreams:
    return cast(EventStreams, request.app.state.event_streams)


class CountedStream(EventSourceResponse):
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
    job_id: str, last: EventId | None, render: Render, streams: EventStreams
) -> AsyncIterator[ServerSentEvent]:
    stream = streams.watch(job_id, render)
    try:
        quiet_since = time.monotonic()
        shown: dict[str, Any] | None = None  # the last preview sent: each is sent once
        while True:
            stream.ready.clear()
            if stream.gone:  # jobs are not deleted, but a stream must not outlive its row
                return
            now = stream.latest
            if now is not None and (last is None or now.id > last):
                last = now.id
                quiet_since = time.monotonic()
                yield ServerSentEvent(json.dumps(now.data), event=now.event, id=str(now.id))
                if now.final:
                    return
                if now.preview is not None and now.preview != shown:
                    shown = now.preview
                    yield ServerSentEvent(json.dumps(now.preview), event="preview", id=str(now.id))
                continue
            idle_left = streams.idle_seconds - (time.monotonic() - quiet_since)
            if idle_left <= 0:
                return
            with suppress(TimeoutError):
                await asyncio.wait_for(stream.ready.wait(), idle_left)
    finally:
        streams.unwatch(job_id, stream)


def _stream(
    job: JobRecord, key: ApiKey, last_event_id: str | None, render: Render, streams: EventStreams
) -> Response:
    last = EventId.parse(last_event_id)
    if job.status.is_terminal and last is not None and last >= final_id(job):
        return Response(status_code=204)  # the client has the result: no more reconnects
    refused = streams.acquire(key.id)
    if refused is not None:
        raise Refused(429, refused)
    return CountedStream(_events(job.id, last, render, streams), lambda: streams.release(key.id))


Deps = Annotated[Services, Depends(get_services)]
Streams = Annotated[EventStreams, Depends(get_streams)]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]


@router.get("/flux/events", summary="A job's progress as Server-Sent Events, ending with its fetch JSON")
async def reseller_events(
    request: Request,
    key: Annotated[ApiKey, Depends(reseller_key)],
    services: Deps,
    streams: Streams,
    job_id: Annotated[str | None, Query(alias="jobId", max_length=100, description="The job's id.")] = None,
    last_event_id: LastEventId = None,
) -> Response:
    if not job_id:
        raise Refused(400, "jobId: is required")
    job = await anyio.to_thread.run_sync(lambda: services.jobs.get(job_id.strip(), key_id=key.id))
    if job is None:
        raise Refused(404, f"jobId: no job {job_id!r} for this key")
    return _stream(job, key, last_event_id, for_path(request.url.path).render_job, streams)


@router.get("/v1/events", summary="A task's progress as Server-Sent Events, ending with its get_result JSON")
async def vendor_events(
    request: Request,
    key: Annotated[ApiKey, Depends(vendor_key)],
    services: Deps,
    streams: Streams,
    task_id: Annotated[str, Query(alias="id", min_length=1, max_length=100, description="The task's id.")],
    last_event_id: LastEventId = None,
) -> Response:
    job = await anyio.to_thread.run_sync(lambda: services.jobs.get(task_id.strip(), key_id=key.id))
    if job is None:
        raise Refused(404, "Task not found")
    return _stream(job, key, last_event_id, for_path(request.url.path).render_job, streams)
