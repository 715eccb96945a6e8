"""The job runner: claim -> inputs -> moderate -> upsample -> engine -> moderate -> encode -> store -> settle
(-> webhook).

A worker is a thread that owns one job at a time. While it runs, a ticker heartbeats the job so that
another worker can take it back if this process dies; the same heartbeat carries progress out and
the cancel flag in.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Collection
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from PIL import Image

from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.notes import PREVIEW
from fluxserve.core.params import GenerationParams
from fluxserve.engines.base import (
    Adapter,
    BatchingEngine,
    Engine,
    EngineHooks,
    EngineRequest,
    EngineResult,
    Engines,
    NamedImage,
)
from fluxserve.errors import EngineError, JobCanceled, JobFailure, Moderated
from fluxserve.finetunes.store import read_adapter
from fluxserve.jobs.outage import while_away
from fluxserve.jobs.retention import drop_inputs
from fluxserve.jobs.store import Claims, Drawn
from fluxserve.safety.moderation import Moderator
from fluxserve.storage.base import BlobStore, put_patiently
from fluxserve.worker.beacon import Liveness
from fluxserve.worker.inputs import InputLoader
from fluxserve.worker.upsample import PromptEnhancer

log = logging.getLogger("fluxserve.worker")

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PREVIEW_QUALITY = 75  # JPEG quality of live previews: a 256 px preview is a few kilobytes
PREVIEW_SHARE = 20  # a job's next preview waits at least this many times as long as its last one took
ENGINE_STATE = "engine_state"  # the job's details key for what an engine checkpointed
T = TypeVar("T")


def encode_image(image: Image.Image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    elif output_format == "webp":
        image.convert("RGB").save(buffer, format="WEBP", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


class _Heartbeat:
    """Reports progress at most every ``min_interval`` and beats every ``interval`` while the engine is
    alive: an engine that has not reported progress nor asked about cancellation for ``stall_seconds``
    is hung, and its job stops beating so that a live worker takes it back."""

    def __init__(
        self, store: Claims, job: JobRecord, worker_id: str, interval: float, stall_seconds: float
    ) -> None:
        self._store = store
        self._job = job
        self._worker_id = worker_id
        self._interval = interval
        self._stall_seconds = stall_seconds
        self._progress: float | None = None
        self._last = 0.0
        self._active = time.monotonic()
        self._canceled = False
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id[:8]}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def stalled(self) -> bool:
        return time.monotonic() - self._active > self._stall_seconds

    def _beat(self) -> None:
        """One beat. A failed one (the database away) is logged and the next tries again: it must neither
        end the ticker nor reach the engine through :meth:`progress`, which would fail the job."""
        self._last = time.monotonic()
        try:
            ours, cancel = self._store.heartbeat(self._job.id, self._worker_id, self._progress)
        except Exception:
            log.exception("heartbeat failed", extra={"job_id": self._job.id})
            return
        self._lost = not ours
        self._canceled = self._canceled or cancel

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self.stalled:
                log.error(
                    "engine made no progress; no longer vouching for the job", extra={"job_id": self._job.id}
                )
                return
            self._beat()

    def progress(self, fraction: float) -> None:
        self._active = time.monotonic()
        self._progress = round(min(max(fraction, 0.0), 1.0), 4)
        if time.monotonic() - self._last >= min(0.5, self._interval):
            self._beat()

    def canceled(self) -> bool:
        """Stop when the client canceled, or when the job was given to another worker."""
        self._active = time.monotonic()
        return self._canceled or self._lost


class Worker:
    def __init__(
        self,
        worker_id: str,
        store: Claims,
        engines: Engines,
        blobs: BlobStore,
        inputs: InputLoader,
        enhancer: PromptEnhancer,
        *,
        heartbeat_seconds: float,
        stale_after_seconds: float,
        engine_stall_seconds: float,
        max_attempts: int,
        poll_seconds: float,
        previews_every: float | None = None,
        liveness: Liveness | None = None,
        models: Collection[str] | None = None,
        holding: Callable[[], Collection[str]] = tuple,
        moderator: Moderator | None = None,
    ) -> None:
        """``models`` (None: any) are the models this worker serves; ``holding`` says which of them have
        their weights in memory now, whose jobs it prefers (see :meth:`Claims.claim`). ``moderator``
        (None: moderation off) checks prompts, inputs and outputs of the engines that do not moderate
        themselves. ``previews_every`` (None: no previews) is how often, in seconds, a running job's live
        preview is decoded and written to its row."""
        self.worker_id = worker_id
        self._models = models
        self._holding = holding
        self._store = store
        self._engines = engines
        self._blobs = blobs
        self._inputs = inputs
        self._enhancer = enhancer
        self._moderator = moderator
        self._heartbeat_seconds = heartbeat_seconds
        self._stale_after = stale_after_seconds
        self._stall_seconds = engine_stall_seconds
        self.liveness = liveness or Liveness()
        self._max_attempts = max_attempts
        self._poll = poll_seconds
        self._previews_every = previews_every
        self._previewed: dict[str, float] = {}  # job id -> when its next preview is due (monotonic)
        self._next_reap = 0.0
        self._stop = threading.Event()  # run's: once set, a draining worker claims nothing more

    def run(self, stop: threading.Event) -> None:
        log.info("worker started", extra={"worker_id": self.worker_id})
        self._stop = stop
        while not stop.is_set():
            try:
                self._reap()
                job = self._store.claim(self.worker_id, self._models, self._holding())
            except Exception:
                log.exception("claim failed; retrying")
                stop.wait(1.0)
                continue
            if job is None:  # idle: until a submit wakes us (PostgreSQL) or the poll interval passes
                self._store.wait_for_work(stop, self._poll)
                continue
            try:
                self.process(job)
            except Exception:  # the job is requeued by its missing heartbeat; the worker lives on
                log.exception("worker failed while processing", extra={"job_id": job.id})
        log.info("worker stopped", extra={"worker_id": self.worker_id})

    def _reap(self) -> None:
        """Requeue jobs whose worker stopped heartbeating (it crashed or its machine died)."""
        if time.monotonic() < self._next_reap:
            return
        self._next_reap = time.monotonic() + max(self._stale_after / 3, 0.2)
        cutoff = datetime.now(UTC) - timedelta(seconds=self._stale_after)
        reaped = self._store.requeue_stale(cutoff, self._max_attempts)
        if reaped.requeued or reaped.failed:
            log.warning("requeued stale jobs", extra={"count": reaped.requeued, "failed": len(reaped.failed)})
        for job_id in reaped.failed:  # crash loops, failed now: their inputs are needed no more
            drop_inputs(self._blobs, job_id)

    def process(self, first: JobRecord) -> None:
        """Run a claimed job, together with compatible queued jobs when the engine batches."""
        try:
            # Loading a model can take minutes on a cold worker: the job is vouched for meanwhile, without
            # the stall clock, which measures the engine's steps.
            with _Heartbeat(self._store, first, self.worker_id, self._heartbeat_seconds, math.inf):
                engine = self._engines.get(first.model)
        except EngineError as exc:
            self._finish(first, time.monotonic(), JobStatus.FAILED, str(exc))
            return
        jobs = [first]
        batch = engine.max_batch if isinstance(engine, BatchingEngine) else 1
        if batch > 1 and first.width and first.height and not self._stop.is_set():  # draining: no claims
            jobs += self._store.claim_similar(
                self.worker_id, first.model, first.width, first.height, batch - 1
            )
        started = time.monotonic()
        with ExitStack() as stack:
            beats = {
                job.id: stack.enter_context(
                    _Heartbeat(self._store, job, self.worker_id, self._heartbeat_seconds, self._stall_seconds)
                )
                for job in jobs
            }
            stack.enter_context(self.liveness.watch(beats.values()))
            prepared: list[tuple[JobRecord, EngineRequest]] = []
            # An engine that upsamples itself (the relay: the vendor does it) gets the prompt as sent; one
            # that moderates itself (the relay again) gets the tolerance and no local checks.
            upsample = not getattr(engine, "handles_prompt_upsampling", False)
            checks = None if getattr(engine, "handles_moderation", False) else self._moderator
            for job in jobs:
                log.info("job started", extra={"job_id": job.id, "model": job.model, "attempt": job.attempts})
                try:
                    prepared.append((job, self._request(job, upsample, checks)))
                except Exception as exc:
                    self._finish(job, started, *_failure(job, exc))
            for group in _groups(engine, prepared):
                self._generate(engine, group, beats, started, checks)

    def _generate(
        self,
        engine: Engine,
        group: list[tuple[JobRecord, object]],
        beats: dict[str, _Heartbeat],
        started: float,
        checks: Moderator | None,
    ) -> None:
        """One engine call for the group (see :func:`_groups`); each job then ends with its own outcome: a
        flagged output refuses its own job only."""
        hooks = [
            EngineHooks(
                progress=beats[job.id].progress,
                canceled=beats[job.id].canceled,
                checkpoint=partial(self._checkpoint, job),
                preview=partial(self._preview, job),
            )
            for job, _ in group
        ]
        work = [item for _, item in group]
        outcomes: list[EngineResult | BaseException]
        try:
            if isinstance(work[0], BaseException):  # the engine refused it when planning: it fails alone
                outcomes = [work[0]]
            elif isinstance(engine, BatchingEngine):
                outcomes = list(engine.generate_batch(work, hooks))
            else:
                assert len(group) == 1 and isinstance(work[0], EngineRequest)
                outcomes = [engine.generate(work[0], hooks[0])]
        except Exception as exc:
            outcomes = [exc] * len(group)
        for (job, _), outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._finish(job, started, *_failure(job, outcome))
                continue
            try:
                if checks is not None:
                    checks.check_output(
                        outcome.image, GenerationParams.model_validate(job.params).safety_tolerance
                    )
                result_key = f"results/{job.created_at:%Y-%m-%d}/{job.id}.{job.output_format}"
                data = encode_image(outcome.image, job.output_format)
                put_patiently(self._blobs, result_key, data, CONTENT_TYPES[job.output_format])
            except Exception as exc:
                self._finish(job, started, *_failure(job, exc))
                continue
            details = {**_without_preview(job.details), **outcome.details, "batch_size": len(group)}
            # What the engine reports wins: a relayed job's final prompt and seed are the vendor's.
            drawn = Drawn(outcome.prompt, outcome.seed, outcome.image.width, outcome.image.height)
            self._finish(job, started, JobStatus.SUCCEEDED, None, result_key, details, drawn)

    def _patiently(self, write: Callable[[], T]) -> T:
        """A write of a running job, repeated while the database is away (a restart, a failover) for up to
        the stale limit, while the job's heartbeat keeps it ours: given up, the job would fail for nothing,
        or be run again once it went stale."""
        return while_away(write, self._stale_after)

    def _preview(self, job: JobRecord, fraction: float, draw: Callable[[], Image.Image]) -> None:
        """Write the job's live preview when previews are on and it is due: a small JPEG, as a data URI in
        its details, with the progress it goes with, in one statement (the progress change is what the
        change feed announces to the event streams). The next is due ``previews_every`` later, and no
        sooner than :data:`PREVIEW_SHARE` times the drawing took, so that previews take at most about
        1/PREVIEW_SHARE of a job's time even where decoding is slow (a CPU). A preview that fails is
        logged and skipped: it must never fail the job."""
        every = self._previews_every
        due = self._previewed.get(job.id)
        if every is None or (due is not None and time.monotonic() < due):
            return
        started = time.monotonic()
        self._previewed[job.id] = started + every
        try:
            drawn = draw()
            self._previewed[job.id] = max(
                started + every, started + PREVIEW_SHARE * (time.monotonic() - started)
            )
            buffer = io.BytesIO()
            drawn.convert("RGB").save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
            image = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
            progress = round(min(max(fraction, 0.0), 1.0), 4)
            details = {**job.details, PREVIEW: {"image": image, "progress": progress}}
            self._store.update_running(job.id, self.worker_id, details=details, progress=progress)
        except Exception:
            log.exception("live preview failed; the job goes on", extra={"job_id": job.id})

    def _checkpoint(self, job: JobRecord, state: dict[str, Any]) -> None:
        job.details[ENGINE_STATE] = state
        self._patiently(partial(self._store.update_running, job.id, self.worker_id, details=job.details))

    def _finish(
        self,
        job: JobRecord,
        started: float,
        status: JobStatus,
        error: str | None,
        result_key: str | None = None,
        details: dict[str, Any] | None = None,
        drawn: Drawn | None = None,
    ) -> None:
        if self._previewed.pop(job.id, None) is not None and details is None:
            details = _without_preview(job.details)  # a failed job's row keeps no preview
        # The store refuses the write when the job was meanwhile requeued to another worker.
        finish = partial(
            self._store.finish,
            job.id,
            self.worker_id,
            status,
            error=error,
            result_key=result_key,
            details=details,
            drawn=drawn,
        )
        recorded = self._patiently(finish)
        if recorded:  # the job has ended: its inputs go (when not recorded, another worker owns it now)
            drop_inputs(self._blobs, job.id)
        log.info(
            "job finished",
            extra={
                "job_id": job.id,
                "status": status.value,
                "seconds": round(time.monotonic() - started, 3),
                "recorded": recorded,
                "error": error,
            },
        )

    def _request(self, job: JobRecord, upsample: bool, checks: Moderator | None) -> EngineRequest:
        """Decode the stored inputs, check the prompt and inputs (:class:`Moderated` before any work), and
        settle the final prompt (the size was settled before the queue).

        With moderation on, the tolerance the engine gets (the relay forwards it) is capped by the
        operator's floor, whether or not the checks run here."""
        params = GenerationParams.model_validate(job.params)
        if self._moderator is not None:
            tolerance = self._moderator.tolerance(params.safety_tolerance)
            params = params.model_copy(update={"safety_tolerance": tolerance})
        if checks is not None:
            checks.check_prompt(params.prompt, params.safety_tolerance)
        images = [
            NamedImage(image.field, self._inputs.load(image.ref, image.field))
            for image in params.input_images
        ]
        image_prompt = None
        if params.image_prompt:
            image_prompt = self._inputs.load(params.image_prompt, "image_prompt")
        if checks is not None:
            for named in images:
                checks.check_input(named.image, named.field, params.safety_tolerance)
            if image_prompt is not None:
                checks.check_input(image_prompt, "image_prompt", params.safety_tolerance)
        assert job.width is not None and job.height is not None
        prompt = params.prompt
        if params.prompt_upsampling and upsample:
            prompt = self._enhancer.enhance(prompt, job.seed)
        if prompt != job.prompt:  # an upsampled prompt shows while the job runs; finish writes the rest
            self._patiently(partial(self._store.update_running, job.id, self.worker_id, prompt=prompt))
        return EngineRequest(
            params,
            prompt=prompt,
            width=job.width,
            height=job.height,
            seed=job.seed,
            images=images,
            image_prompt=image_prompt,
            resume=job.details.get(ENGINE_STATE),
            adapter=self._adapter(params),
        )

    def _adapter(self, params: GenerationParams) -> Adapter | None:
        """The finetune a job runs with (its file was found at submit); read when a worker first loads it."""
        if params.finetune_id is None or params.finetune_file is None:
            return None
        strength = 1.0 if params.finetune_strength is None else params.finetune_strength
        name, file = params.finetune_id, params.finetune_file
        return Adapter(name, file, strength, partial(read_adapter, file, self._blobs, name))


def _without_preview(details: dict[str, Any]) -> dict[str, Any]:
    """A job's details less a live preview (an earlier attempt's, on a job run again): an ended job has
    its result instead."""
    return {name: value for name, value in details.items() if name != PREVIEW}


def _failure(job: JobRecord, exc: BaseException) -> tuple[JobStatus, str]:
    """The status and message a job ends with when ``exc`` stopped it."""
    if isinstance(exc, Moderated):
        status = JobStatus.REQUEST_MODERATED if exc.kind == "request" else JobStatus.CONTENT_MODERATED
        return status, str(exc)
    if isinstance(exc, JobCanceled):
        return JobStatus.CANCELED, "Canceled by the client"
    if isinstance(exc, JobFailure):
        return JobStatus.FAILED, str(exc)
    log.error("job crashed", exc_info=exc, extra={"job_id": job.id})
    return JobStatus.FAILED, f"Internal error while generating: {type(exc).__name__}"


def _groups(
    engine: Engine, prepared: list[tuple[JobRecord, EngineRequest]]
) -> list[list[tuple[JobRecord, object]]]:
    """Each job with what the engine runs for it, in groups: jobs whose plans share a batch key run
    together; the rest run alone, in claim order.

    A batching engine plans each request once, here, and the plan is keyed and run without planning it
    again; a request it refuses carries the exception instead and fails alone while the others run. An
    engine that does not batch gets each request as it is.
    """
    if not isinstance(engine, BatchingEngine):
        return [[(job, request)] for job, request in prepared]
    groups: dict[Any, list[tuple[JobRecord, object]]] = {}
    alone: list[list[tuple[JobRecord, object]]] = []
    for job, request in prepared:
        try:
            plan = engine.plan(request)
        except Exception as exc:  # refused (or an engine bug): _generate fails this job only
            alone.append([(job, exc)])
            continue
        key = engine.batch_key(plan)
        if key is None:
            alone.append([(job, plan)])
        else:
            groups.setdefault(key, []).append((job, plan))
    return [*groups.values(), *alone]
