"""The fetch stage: a job's URL inputs are downloaded before the job is queued, never by a worker.

A submit with an ``input_image`` (or ``image_prompt``) URL writes its job as ``fetching``. Every API process
runs an :class:`InputFetcher`, which leases such jobs from the database, downloads their URLs through the
SSRF guard on the event loop (a slow URL holds a coroutine, not a thread, a worker or the GPU), stores the
decoded images with the job's uploads and then queues the job with its size resolved. It uses only the
store's :class:`~fluxserve.jobs.store.FetchLeases` role. A key has at most
``per_key`` fetches leased at once across the cluster (so its slow URLs wait behind each other, not
behind another key's), and an API process at most ``concurrency``. A URL that fails ends its job as
failed with a message naming the field. A lease (``fetch_owner``; never the columns of a worker's claim)
is renewed after each image; one not renewed for ``lease_seconds`` (its process died) is freed for another
process to take, so nothing is lost. The change
feed wakes the stage when a job enters ``fetching`` (submitted to any API process); its poll remains for
leases that lapse.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import uuid
from contextlib import suppress
from datetime import timedelta

from PIL import Image

from fluxserve.core.fields import REFERENCE_FIELDS
from fluxserve.core.job import JobRecord
from fluxserve.core.models import spec_of
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.core.pricing import Quote, requote
from fluxserve.core.sizes import output_size
from fluxserve.db.connection import utcnow
from fluxserve.errors import FetchError, InvalidInput
from fluxserve.jobs.retention import drop_inputs
from fluxserve.jobs.store import FetchLeases, FetchOutcome
from fluxserve.jobs.submit import BLOB_PREFIX, store_input
from fluxserve.safety.fetch import NetworkPolicy, fetch_bytes
from fluxserve.safety.images import decode_image_bytes, is_url
from fluxserve.storage.base import BlobStore

log = logging.getLogger("fluxserve.fetching")


class InputFetcher:
    def __init__(
        self,
        leases: FetchLeases,
        blobs: BlobStore,
        policy: NetworkPolicy,
        *,
        max_bytes: int,
        max_pixels: int,
        timeout: float,
        concurrency: int,
        per_key: int,
        poll_seconds: float = 5.0,
    ) -> None:
        self._leases = leases
        self._blobs = blobs
        self._policy = policy
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._timeout = timeout
        self._concurrency = concurrency
        self._per_key = per_key
        self._poll = poll_seconds
        # A lease outlives the slowest image a live process can still be downloading.
        self.lease_seconds = 3 * timeout
        self.owner = f"fetch:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """A job to fetch was just submitted (called from any thread, e.g. the change feed's): look now
        rather than at the next poll."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self._lease()
                except Exception:  # a database hiccup: the next round tries again
                    log.exception("fetch stage: leasing failed")
                woken = asyncio.create_task(self._wake.wait())
                await asyncio.wait({woken, stopping}, timeout=self._poll, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
        finally:
            stopping.cancel()
            for task in list(self._tasks):  # their leases lapse and another process takes the jobs
                task.cancel()
            with suppress(asyncio.CancelledError):
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _lease(self) -> None:
        stale = utcnow() - timedelta(seconds=self.lease_seconds)
        await asyncio.to_thread(self._leases.release_stale, stale)
        free = self._concurrency - len(self._tasks)
        if free <= 0:
            return
        for job in await asyncio.to_thread(self._leases.lease, self.owner, free, self._per_key):
            task = asyncio.create_task(self.fetch(job))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.wake()  # a slot is free: a job that waited for it may go now

    async def fetch(self, job: JobRecord) -> None:
        """Download, store and queue one leased job, or end it as failed naming the field."""
        try:
            await self._fetch(job)
        except (FetchError, InvalidInput) as error:
            await self._fail(job, str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a storage or database fault: said plainly, never "Internal error"
            log.exception("fetch stage: a job's inputs could not be stored", extra={"job_id": job.id})
            await self._fail(job, f"the inputs could not be stored ({type(error).__name__}); submit again")

    async def _fetch(self, job: JobRecord) -> None:
        params = GenerationParams.model_validate(job.params)
        images: list[ImageRef] = []
        sizes: list[tuple[int, int] | None] = []
        for image in params.input_images:
            ref, size = await self._resolve(job, image.field, image.ref)
            images.append(ImageRef(field=image.field, ref=ref))
            sizes.append(size)
        image_prompt = params.image_prompt
        if image_prompt is not None:
            image_prompt, _ = await self._resolve(job, "image_prompt", image_prompt)
        params = params.model_copy(update={"input_images": images, "image_prompt": image_prompt})
        if job.width is not None and job.height is not None:  # resolved at submit
            size = (job.width, job.height)
        else:  # it waited for the first input image, a URL, whose size is known now
            resolved = output_size(spec_of(job.model).size_rule, params, sizes[0] if sizes else None)
            assert resolved is not None
            size = resolved
        references = [  # every reference's exact size: those sent inline are read back from the store
            got if got is not None else await asyncio.to_thread(self._stored_size, image.ref)
            for image, got in zip(params.input_images, sizes, strict=True)
            if image.field in REFERENCE_FIELDS
        ]
        price = requote(spec_of(job.model), Quote(job.cost, job.input_mp, job.output_mp), size, references)
        outcome = await asyncio.to_thread(
            self._leases.fetched, job.id, self.owner, params.model_dump(mode="json"), *size, price
        )
        if outcome is not FetchOutcome.QUEUED:  # canceled meanwhile, or the lease lapsed and another took it
            log.info("fetch stage: job no longer ours", extra={"job_id": job.id, "outcome": outcome.value})
            if outcome is FetchOutcome.ENDED:
                await asyncio.to_thread(drop_inputs, self._blobs, job.id)

    async def _resolve(self, job: JobRecord, field: str, ref: str) -> tuple[str, tuple[int, int] | None]:
        """A URL downloaded, decoded and stored (its stored reference and size); anything else as it is."""
        if not is_url(ref):
            return ref, None
        try:
            data = await fetch_bytes(ref, self._policy, self._max_bytes, self._timeout)
        except FetchError as error:
            raise FetchError(f"{field}: {error}") from error
        decoded = await asyncio.to_thread(decode_image_bytes, data, field, self._max_pixels)
        stored = await asyncio.to_thread(store_input, self._blobs, job.id, field, decoded)
        await asyncio.to_thread(self._leases.renew, job.id, self.owner)
        return stored, decoded.size

    def _stored_size(self, ref: str) -> tuple[int, int]:
        """The size of an input submit stored (only its header is decoded)."""
        with Image.open(io.BytesIO(self._blobs.get(ref.removeprefix(BLOB_PREFIX)))) as image:
            return image.size

    async def _fail(self, job: JobRecord, message: str) -> None:
        ended = await asyncio.to_thread(self._leases.fail, job.id, self.owner, message)
        if ended:
            await asyncio.to_thread(drop_inputs, self._blobs, job.id)
