"""The job runner: claim -> inputs -> upsample -> engine -> encode -> store -> settle (-> webhook).

A worker is a thread that owns one job at a time. While it runs, a ticker heartbeats the job so that
another worker can take it back if this process dies; the same heartbeat carries progress out and
the cancel flag in.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from PIL import Image

from fluxserve.core.job import Job, JobStatus
from fluxserve.core.params import GenerationParams
from fluxserve.core.sizes import output_size
from fluxserve.engines.base import EngineError, EngineHooks, EngineRequest, JobCanceled, Moderated
from fluxserve.engines.registry import EngineRegistry
from fluxserve.jobs.store import JobStore
from fluxserve.jobs.submit import image_field
from fluxserve.safety.fetch import FetchError
from fluxserve.safety.images import ImageInputError
from fluxserve.storage.base import BlobStore
from fluxserve.worker.inputs import InputLoader
from fluxserve.worker.upsample import PromptEnhancer

log = logging.getLogger("fluxserve.worker")

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


def encode_image(image: Image.Image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


class _Heartbeat:
    """Reports progress at most every ``min_interval`` and beats every ``interval`` regardless."""

    def __init__(self, store: JobStore, job: Job, worker_id: str, interval: float) -> None:
        self._store = store
        self._job = job
        self._worker_id = worker_id
        self._interval = interval
        self._progress: float | None = None
        self._last = 0.0
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

    def _beat(self) -> None:
        ours, cancel = self._store.heartbeat(self._job.id, self._worker_id, self._progress)
        self._last = time.monotonic()
        self._lost = not ours
        self._canceled = self._canceled or cancel

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception:  # a database hiccup must not kill the job; the next beat retries
                log.exception("heartbeat failed", extra={"job_id": self._job.id})

    def progress(self, fraction: float) -> None:
        self._progress = round(min(max(fraction, 0.0), 1.0), 4)
        if time.monotonic() - self._last >= min(0.5, self._interval):
            self._beat()

    def canceled(self) -> bool:
        """Stop when the client canceled, or when the job was given to another worker."""
        return self._canceled or self._lost


class Worker:
    def __init__(
        self,
        worker_id: str,
        store: JobStore,
        engines: EngineRegistry,
        blobs: BlobStore,
        inputs: InputLoader,
        enhancer: PromptEnhancer,
        *,
        heartbeat_seconds: float,
        stale_after_seconds: float,
        max_attempts: int,
        poll_seconds: float,
    ) -> None:
        self.worker_id = worker_id
        self._store = store
        self._engines = engines
        self._blobs = blobs
        self._inputs = inputs
        self._enhancer = enhancer
        self._heartbeat_seconds = heartbeat_seconds
        self._stale_after = stale_after_seconds
        self._max_attempts = max_attempts
        self._poll = poll_seconds
        self._next_reap = 0.0

    def run(self, stop: threading.Event) -> None:
        log.info("worker started", extra={"worker_id": self.worker_id})
        while not stop.is_set():
            try:
                self._reap()
                job = self._store.claim(self.worker_id)
            except Exception:
                log.exception("claim failed; retrying")
                stop.wait(1.0)
                continue
            if job is None:
                stop.wait(self._poll)
                continue
            self.process(job)
        log.info("worker stopped", extra={"worker_id": self.worker_id})

    def _reap(self) -> None:
        """Requeue jobs whose worker stopped heartbeating (it crashed or its machine died)."""
        if time.monotonic() < self._next_reap:
            return
        self._next_reap = time.monotonic() + max(self._stale_after / 3, 0.2)
        cutoff = datetime.now(UTC) - timedelta(seconds=self._stale_after)
        count = self._store.requeue_stale(cutoff, self._max_attempts)
        if count:
            log.warning("requeued stale jobs", extra={"count": count})

    def process(self, job: Job) -> None:
        started = time.monotonic()
        log.info("job started", extra={"job_id": job.id, "model": job.model, "attempt": job.attempts})
        status, error, result_key, details = JobStatus.FAILED, None, None, dict(job.details)
        with _Heartbeat(self._store, job, self.worker_id, self._heartbeat_seconds) as beat:
            try:
                request = self._request(job)
                hooks = EngineHooks(progress=beat.progress, canceled=beat.canceled)
                result = self._engines.get(job.model).generate(request, hooks)
                result_key = f"results/{job.created_at:%Y-%m-%d}/{job.id}.{job.output_format}"
                self._blobs.put(
                    result_key,
                    encode_image(result.image, job.output_format),
                    CONTENT_TYPES[job.output_format],
                )
                details.update(result.details)
                status = JobStatus.SUCCEEDED
            except Moderated as exc:
                error = str(exc)
                status = JobStatus.REQUEST_MODERATED if exc.kind == "request" else JobStatus.CONTENT_MODERATED
            except JobCanceled:
                status, error = JobStatus.CANCELED, "Canceled by the client"
            except (EngineError, FetchError, ImageInputError) as exc:
                error = str(exc)
            except Exception as exc:
                log.exception("engine crashed", extra={"job_id": job.id})
                error = f"Internal error while generating: {type(exc).__name__}"
        # The store refuses the write when the job was meanwhile requeued to another worker.
        finished = self._store.finish(
            job.id, self.worker_id, status, error=error, result_key=result_key, details=details
        )
        log.info(
            "job finished",
            extra={
                "job_id": job.id,
                "status": status.value,
                "seconds": round(time.monotonic() - started, 3),
                "recorded": finished,
                "error": error,
            },
        )

    def _request(self, job: Job) -> EngineRequest:
        """Decode inputs, settle the final size and prompt, and record them on the job."""
        params = GenerationParams.model_validate(job.params)
        images = []
        for index, ref in enumerate(params.input_images):
            images.append(self._load(ref, image_field(index)))
        image_prompt = None
        if params.image_prompt:
            image_prompt = self._load(params.image_prompt, "image_prompt")
        reference = images[0].size if images else None
        width, height = output_size(
            params.model, params.width, params.height, params.aspect_ratio, reference
        ) or (1024, 1024)
        prompt = params.prompt
        if params.prompt_upsampling:
            prompt = self._enhancer.enhance(prompt, job.seed)
        self._store.update_running(job.id, self.worker_id, width=width, height=height, prompt=prompt)
        return EngineRequest(
            model=params.model,
            prompt=prompt,
            width=width,
            height=height,
            seed=job.seed,
            output_format=params.output_format,
            steps=params.steps,
            guidance=params.guidance,
            interval=params.interval,
            raw=params.raw,
            safety_tolerance=params.safety_tolerance,
            prompt_upsampling=params.prompt_upsampling,
            images=images,
            image_prompt=image_prompt,
            image_prompt_strength=params.image_prompt_strength,
        )

    def _load(self, ref: str, field: str) -> Image.Image:
        try:
            return self._inputs.load(ref, field)
        except FetchError as error:
            raise FetchError(f"{field}: {error}") from error
