"""The job store, by role: one small interface per caller, all over the same job rows.

- :class:`JobReads`: a job and its place in the queue (fetch routes, event streams, webhook delivery).
- :class:`Submissions`: admission, submit, Idempotency-Key replay, cancel (the routers and ``Submitter``).
- :class:`Claims`: a worker's side: claim, heartbeat, progress, finish, hand back, the stale-job reaper.
- :class:`FetchLeases`: the fetch stage's leases on jobs waiting for their URL inputs (``jobs/fetching.py``).
- :class:`Expiry`: retention's results past their time, and the inputs no active job owns.

``jobs/store_sql.py`` implements each on SQLAlchemy Core; ``wiring.make_stores`` builds them once per
process. Two words for two kinds of liveness, in their own columns: a worker *heartbeats* the job it
claimed (``worker_id``, ``heartbeat_at``: written by claims only), an API process *renews* its fetch
lease (``fetch_owner``, ``fetch_renewed_at``: fetching jobs only; migration 0014).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.pricing import Quote

# A worker's preference for the models it holds (see Claims.claim): how far down the fair order it
# looks for one, and how long a job may wait before it goes first regardless.
PREFER_WINDOW = 8
PREFER_MAX_WAIT = timedelta(seconds=30)

IDEMPOTENCY_TTL = timedelta(hours=24)  # a repeat after this makes a new job; the old entry is replaced
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Idempotency:
    """A submit's ``Idempotency-Key`` and the hash of its canonical request (dialect, model, parameters)."""

    key: str
    request_hash: str


@dataclass(frozen=True)
class Drawn:
    """What a succeeded job's image was drawn with, as the engine reports it (a relayed job's prompt and
    seed are the vendor's): written by ``finish`` in the transaction that ends the job."""

    prompt: str
    seed: int
    width: int
    height: int


class JobReads(Protocol):
    """What readers of a job need: the fetch routes, the event streams' watcher, the webhook dispatcher."""

    def get(self, job_id: str, key_id: str | None = None) -> JobRecord | None:
        """The job (only if it is ``key_id``'s, when given), or None: one statement."""
        ...

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs the claim order puts before this one (0: it is next in line), or None when
        the job is not queued. Counted up to ``QUEUE_POSITION_CAP``, which therefore means "that many or
        more" (a fetch never counts a long queue)."""
        ...


class Submissions(JobReads, Protocol):
    """The API side of a job's life: admission, the durable write, replays and cancels."""

    def submit(
        self,
        job: JobRecord,
        max_active: int,
        max_active_model: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> JobRecord:
        """Hold the job's price, check the key's active-job limits (all its jobs, and its jobs of this
        model when the model has a limit of its own), and write the row, all in one transaction; raises
        QuotaExceeded or TooManyActiveJobs and then writes nothing.

        With ``idempotency`` the entry is written in the same transaction (unique per key), so that of
        concurrent repeats one writes a job and the others get it back: a live entry (under 24 hours) for
        the same request returns its job instead, without a charge; one for another request raises
        IdempotencyConflict; an expired one is replaced."""
        ...

    def submit_group(
        self, group: Sequence[JobRecord], max_active: int, max_active_model: int | None = None
    ) -> list[JobRecord]:
        """Write several jobs of one request (a Replicate prediction's outputs) in one transaction, as
        ``submit`` writes one: every price held and the limits checked with the earlier ones counted, or
        nothing written (QuotaExceeded, TooManyActiveJobs)."""
        ...

    def admit(
        self, key_id: str, model: str, cost: Decimal, max_active: int, max_active_model: int | None = None
    ) -> None:
        """Raise QuotaExceeded or TooManyActiveJobs when a submit would be refused now: checked before any
        input is decoded or stored (``submit`` checks again, in its transaction)."""
        ...

    def replay(self, key_id: str, idempotency: Idempotency) -> JobRecord | None:
        """The job a live entry with this Idempotency-Key made for the same request, None when there is
        none (or it expired); IdempotencyConflict when it was made for another request. Reads only."""
        ...

    def cancel(self, job_id: str, key_id: str) -> JobRecord | None:
        """Cancel a queued or fetching job at once, or flag a running one for its worker to stop."""
        ...

    def waiting(self) -> int:
        """How many jobs wait for a worker or for their inputs (queued or fetching), of every key."""
        ...


@dataclass(frozen=True)
class Reaped:
    """What one pass of the stale-job reaper did: jobs queued again, and the ids of those it failed (their
    worker stopped heartbeating on their last attempt), whose inputs may go."""

    requeued: int
    failed: tuple[str, ...] = ()


class Claims(Protocol):
    """A worker's side: take queued jobs, heartbeat them, record progress, end them."""

    def claim(
        self,
        worker_id: str,
        models: Collection[str] | None = None,
        prefer: Collection[str] = (),
        window: int = PREFER_WINDOW,
        max_wait: timedelta = PREFER_MAX_WAIT,
    ) -> JobRecord | None:
        """Take the next queued job for this worker, or None: keys with queued jobs take turns, and a
        key's own jobs go oldest first. Never the same job to two workers.

        ``models`` (None: any) are the models this worker serves; it never takes another's job.
        ``prefer`` are the models whose weights it holds: among the next ``window`` jobs in the fair
        order it takes the first of those, so a worker does not unload a model for one job and load it
        back for the next; a job there that has waited longer than ``max_wait`` goes first all the same,
        so no model's jobs starve behind a stream of the preferred one's."""
        ...

    def claim_similar(
        self, worker_id: str, model: str, width: int, height: int, limit: int
    ) -> list[JobRecord]:
        """Take up to ``limit`` more queued jobs of this model and size, to run as one batch (in the same
        order as ``claim``)."""
        ...

    def wait_for_work(self, stop: threading.Event, timeout: float) -> None:
        """Block an idle worker until a job may have been queued (woken at once where the database can
        announce it), ``stop`` is set, or ``timeout`` seconds pass."""
        ...

    def heartbeat(self, job_id: str, worker_id: str, progress: float | None = None) -> tuple[bool, bool]:
        """Record that the worker running the job is alive; returns (still ours, cancel requested)."""
        ...

    def update_running(self, job_id: str, worker_id: str, **fields: Any) -> None:
        """Record what the worker learned while running (an upsampled prompt, an engine's checkpoint)."""
        ...

    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        result_key: str | None = None,
        details: dict[str, Any] | None = None,
        drawn: Drawn | None = None,
    ) -> bool:
        """End the job (with what it was ``drawn`` with, when it succeeded), refund its hold unless it
        succeeded, and queue its webhook, in one transaction; False when the job is no longer this
        worker's (it was requeued or canceled meanwhile)."""
        ...

    def hand_back(self, worker_ids: Collection[str]) -> int:
        """Queue again, at once, the jobs these workers are running (their process is stopping): the attempt
        is not counted, and a worker that finishes one afterwards has its result refused. Returns how many."""
        ...

    def requeue_stale(self, older_than: datetime, max_attempts: int) -> Reaped:
        """Give the jobs whose worker stopped heartbeating before ``older_than`` back to the queue, and fail
        those on their last attempt (crash loops), in one transaction."""
        ...


class FetchOutcome(StrEnum):
    """What became of a leased job the fetch stage tried to queue."""

    QUEUED = "queued"  # it waits for a worker now, its inputs stored
    ENDED = "ended"  # it ended meanwhile (canceled): its stored inputs may go
    LOST = "lost"  # the lease lapsed and another process holds it: leave its inputs alone


class FetchLeases(Protocol):
    """The fetch stage's leases on jobs waiting for their URL inputs: an API process (``owner``) renews
    its lease after each image; one not renewed is freed for another process."""

    def lease(self, owner: str, limit: int, per_key: int) -> list[JobRecord]:
        """Up to ``limit`` unleased jobs waiting for their URL inputs, oldest first, leased to ``owner``;
        a key with ``per_key`` leased already gets no more (so one key's slow URLs hold its own slots)."""
        ...

    def renew(self, job_id: str, owner: str) -> bool:
        """Renew ``owner``'s lease; False when the job is no longer its (canceled, or leased again)."""
        ...

    def fetched(
        self,
        job_id: str,
        owner: str,
        params: dict[str, Any],
        width: int,
        height: int,
        price: Quote | None = None,
    ) -> FetchOutcome:
        """Queue a leased job with its inputs stored, unless it is no longer ``owner``'s. With ``price``,
        the job's hold is brought to it (a megapixel price known now that the inputs are)."""
        ...

    def fail(self, job_id: str, owner: str, error: str) -> bool:
        """End a leased job as failed (an input URL could not be used), refunding its hold and queueing its
        webhook; False when the job is no longer ``owner``'s."""
        ...

    def release_stale(self, older_than: datetime) -> int:
        """Free the leases not renewed since ``older_than`` (their API process died); how many."""
        ...


class Expiry(Protocol):
    """Retention's reads and marks: results past their time, and which input folders still have an owner."""

    def results_to_expire(self, finished_before: datetime, limit: int) -> list[tuple[str, str]]:
        """(job id, result key) of succeeded jobs finished before the cutoff whose result is still kept,
        oldest first."""
        ...

    def mark_results_expired(self, job_ids: Collection[str], pruned: bool = False) -> int:
        """Record that these jobs' results were deleted (``pruned``: by ``fluxserve prune``, not by the
        server's retention sweep); the rows stay. Returns the rows marked."""
        ...

    def active_ids(self, job_ids: Collection[str]) -> set[str]:
        """Those of ``job_ids`` whose job is fetching, queued or running (an unknown id is not active)."""
        ...


@dataclass(frozen=True)
class Stores:
    """Each role's implementation, built once per process (``wiring.make_stores``) and handed to the
    caller that uses it."""

    reads: JobReads
    submissions: Submissions
    claims: Claims
    fetches: FetchLeases
    expiry: Expiry
