"""Turning a validated request into a durable job: seed, stored inputs, size, price, limits."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import secrets
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit

from PIL import Image

from fluxserve.accounts.keys import ApiKey
from fluxserve.core.fields import REFERENCE_FIELDS
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.models import Family, ModelSpec, SurfaceName, spec_of
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.core.pricing import quote
from fluxserve.core.sizes import output_size
from fluxserve.errors import AddressRefused, FetchError, InvalidInput, QuotaExceeded, ServerBusy
from fluxserve.jobs.store import Idempotency, Submissions
from fluxserve.safety.fetch import NetworkPolicy, vet
from fluxserve.safety.images import decode_image_input, is_url
from fluxserve.storage.base import BlobStore

KONTEXT_IMAGE_TOLERANCE = 2
BLOB_PREFIX = "blob:"
INPUTS = "inputs/"  # a job's uploads are stored under inputs/<job id>/
WEBHOOK_RESOLVE_SECONDS = 2.0  # a webhook_url's name that does not resolve in time is left to delivery


@dataclass(frozen=True)
class Limits:
    max_active: int  # queued plus running jobs of one key
    max_active_per_model: dict[str, int]  # operator overrides of the model table's own limits
    max_input_bytes: int
    max_input_pixels: int
    max_waiting: int | None = None  # queued and fetching jobs of all keys; None: no cap


def inputs_prefix(job_id: str) -> str:
    return f"{INPUTS}{job_id}/"


class Submitter:
    def __init__(
        self,
        store: Submissions,
        blobs: BlobStore,
        limits: Limits,
        policy: NetworkPolicy,
    ) -> None:
        """A job that waits for its URL inputs is announced to the fetch stage by the change feed (its
        row's insert), in every API process alike."""
        self._store = store
        self._blobs = blobs
        self._limits = limits
        self._policy = policy

    @property
    def max_input_bytes(self) -> int:
        """The most bytes one input image may have (an upload larger is refused before it is read)."""
        return self._limits.max_input_bytes

    def submit(
        self,
        key: ApiKey,
        params: GenerationParams,
        seed: int | None,
        webhook_url: str | None,
        surface: SurfaceName,
        idempotency_key: str | None = None,
        webhook_secret: str | None = None,
    ) -> JobRecord:
        """Write the job (raising QuotaExceeded / TooManyActiveJobs / InvalidInput) and return it.

        With ``idempotency_key``, a repeat of the same request (same surface, model and parameters) by the
        same key within 24 hours returns the first one's job without another charge, and another request
        under that key raises IdempotencyConflict. ``webhook_url`` must not reach an address the submitter's
        network policy refuses.
        """
        # Only a submit with uploads to decode and store checks before that work (a key that cannot have
        # the job costs no decoding and leaves no file); every other is checked once, in the transaction.
        uploads = any(not is_url(ref) for ref in _input_refs(params))
        idempotency = None
        if idempotency_key is not None:
            digest = request_hash(params, seed, webhook_url, surface, webhook_secret)
            idempotency = Idempotency(idempotency_key, digest)
            replayed = self._store.replay(key.id, idempotency) if uploads else None
            if replayed is not None:  # a repeat stores nothing
                return replayed
        spec, model_limit = self._admit(key, params, webhook_url, uploads, 1)
        job_id = str(uuid.uuid4())
        quoted: Decimal | None = None
        try:
            job = self._new_job(key, spec, params, seed, webhook_url, surface, job_id)
            job.webhook_secret, quoted = webhook_secret, job.cost
            job = self._store.submit(job, self._limits.max_active, model_limit, idempotency)
        except Exception as error:
            self._blobs.delete_prefix(inputs_prefix(job_id))  # refused after all (a race): no orphan
            if isinstance(error, QuotaExceeded):  # the price the key was short of, for the surface's words
                raise QuotaExceeded(quoted, spec.name) from error
            raise
        if job.id != job_id:  # a concurrent repeat of this idempotent submit won: its job stands
            self._blobs.delete_prefix(inputs_prefix(job_id))
        return job

    def submit_group(
        self,
        key: ApiKey,
        params: GenerationParams,
        seeds: Sequence[int | None],
        surface: SurfaceName,
        webhook_url: str | None = None,
        prediction_id: str | None = None,
    ) -> list[JobRecord]:
        """One job per seed, of one request (a Replicate prediction's ``num_outputs``): admitted together,
        all of their prices held and the key's limits checked in one transaction, so that the key gets all
        of them or none (QuotaExceeded names one job's quote)."""
        uploads = any(not is_url(ref) for ref in _input_refs(params))
        spec, model_limit = self._admit(key, params, webhook_url, uploads, len(seeds))
        group: list[JobRecord] = []
        try:
            for seed in seeds:
                job = self._new_job(key, spec, params, seed, webhook_url, surface, str(uuid.uuid4()))
                job.prediction_id = prediction_id
                group.append(job)
            return self._store.submit_group(group, self._limits.max_active, model_limit)
        except Exception as error:
            for job in group:
                self._blobs.delete_prefix(inputs_prefix(job.id))
            if isinstance(error, QuotaExceeded) and group:  # one job's quote: they are the same request
                raise QuotaExceeded(group[0].cost, spec.name, count=len(group)) from error
            raise

    def _admit(
        self, key: ApiKey, params: GenerationParams, webhook_url: str | None, uploads: bool, count: int
    ) -> tuple[ModelSpec, int | None]:
        """The checks before any work: the webhook's address, a full queue, and (for a submit with uploads
        to decode and store) whether the key can have ``count`` jobs now. The model and its limit."""
        if webhook_url is not None:
            check_webhook_url(webhook_url, self._policy)
        spec = spec_of(params.model)
        model_limit = self._limits.max_active_per_model.get(spec.name, spec.max_active)
        if self._limits.max_waiting is not None and self._store.waiting() >= self._limits.max_waiting:
            raise ServerBusy(f"the queue is full ({self._limits.max_waiting} jobs wait); retry shortly")
        if uploads:
            # Admission before work: a key that cannot have this job costs no decoding and leaves no file.
            try:
                self._store.admit(key.id, spec.name, spec.price * count, self._limits.max_active, model_limit)
            except QuotaExceeded as error:  # refused before a quote: the surface names the lowest price
                raise QuotaExceeded(None, spec.name, count=count) from error
        return spec, model_limit

    def _new_job(
        self,
        key: ApiKey,
        spec: ModelSpec,
        params: GenerationParams,
        seed: int | None,
        webhook_url: str | None,
        surface: SurfaceName,
        job_id: str,
    ) -> JobRecord:
        """The job row to write: its images decoded and stored, its size resolved when it can be."""
        if spec.family in (Family.FLUX2, Family.FLUX2_KLEIN) and params.image_prompt is not None:
            params = as_reference(params)
        images: list[ImageRef] = []
        sizes: list[tuple[int, int] | None] = []
        for image in params.input_images:
            ref, size = self._store_image(job_id, image.field, image.ref)
            images.append(ImageRef(field=image.field, ref=ref))
            sizes.append(size)
        image_prompt = None
        if params.image_prompt is not None:
            image_prompt, _ = self._store_image(job_id, "image_prompt", params.image_prompt)
        updates: dict[str, object] = {"input_images": images, "image_prompt": image_prompt}
        if spec.family is Family.KONTEXT and images:
            updates["safety_tolerance"] = min(params.safety_tolerance, KONTEXT_IMAGE_TOLERANCE)
        params = params.model_copy(update=updates)
        # A size that waits for a URL input is resolved once the fetch stage has the image.
        try:
            size = output_size(spec.size_rule, params, sizes[0] if sizes else None)
        except ValueError as error:
            raise InvalidInput("width", str(error)) from None
        check_tool_inputs(spec, params, dict(zip((image.field for image in images), sizes, strict=True)))
        references = [
            size for image, size in zip(images, sizes, strict=True) if image.field in REFERENCE_FIELDS
        ]
        price = quote(spec, size, references)
        waits = any(is_url(ref) for ref in _input_refs(params))
        job = JobRecord(
            id=job_id,
            status=JobStatus.FETCHING if waits else JobStatus.QUEUED,
            key_id=key.id,
            model=params.model,
            surface=surface,
            params=params.model_dump(mode="json"),
            seed=seed if seed is not None else secrets.randbelow(2**32),
            output_format=params.output_format,
            prompt=params.prompt,
            cost=price.cost,
            input_mp=price.input_mp,
            output_mp=price.output_mp,
            width=size[0] if size else None,
            height=size[1] if size else None,
            webhook_url=webhook_url,
        )
        return job

    def _store_image(self, job_id: str, field: str, value: str) -> tuple[str, tuple[int, int] | None]:
        """Keep URLs for the fetch stage; decode base64 now so a bad upload is a 400, not a failure."""
        if is_url(value):
            return value, None
        image = decode_image_input(
            value, field, max_bytes=self._limits.max_input_bytes, max_pixels=self._limits.max_input_pixels
        )
        return store_input(self._blobs, job_id, field, image), image.size


def _input_refs(params: GenerationParams) -> list[str]:
    """Every image a request carries (a URL or base64)."""
    prompt = [params.image_prompt] if params.image_prompt is not None else []
    return [image.ref for image in params.input_images] + prompt


def store_input(blobs: BlobStore, job_id: str, field: str, image: Image.Image) -> str:
    """Keep a decoded input image (as PNG) with its job's inputs; the reference the job row holds."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    key = f"{inputs_prefix(job_id)}{field}.png"
    blobs.put(key, buffer.getvalue(), "image/png")
    return BLOB_PREFIX + key


def as_reference(params: GenerationParams) -> GenerationParams:
    """FLUX.2 has no image prompt: the reseller's ``image_prompt`` becomes its next reference image
    (``input_image_N`` after those sent), so every engine and the relay see one kind of input."""
    taken = {image.field for image in params.input_images}
    free = next(name for name in REFERENCE_FIELDS if name not in taken)
    assert params.image_prompt is not None
    images = [*params.input_images, ImageRef(field=free, ref=params.image_prompt)]
    return params.model_copy(update={"input_images": images, "image_prompt": None})


def check_tool_inputs(
    spec: ModelSpec, params: GenerationParams, sizes: dict[str, tuple[int, int] | None]
) -> None:
    """Fill has a mask the size of its image (when both were uploaded); expand grows at least one side.

    The vendor also reads a fill's mask from the image's alpha channel; this server flattens uploads to
    RGB when it stores them, so it asks for the mask instead of repainting nothing."""
    image, mask = sizes.get("image"), sizes.get("mask")
    if spec.family is Family.FILL and "mask" not in sizes:
        raise InvalidInput("mask", "is required (this server does not take the mask from the image's alpha)")
    if spec.family is Family.FILL and image is not None and mask is not None and image != mask:
        raise InvalidInput(
            "mask", f"must be the size of image ({image[0]}x{image[1]}), not {mask[0]}x{mask[1]}"
        )
    if spec.family is Family.EXPAND and not (params.top or params.bottom or params.left or params.right):
        raise InvalidInput("top", "at least one of top, bottom, left and right must be above 0")


def request_hash(
    params: GenerationParams,
    seed: int | None,
    webhook_url: str | None,
    surface: SurfaceName,
    webhook_secret: str | None = None,
) -> str:
    """SHA-256 of the request as validated (so ``"steps": "40"`` and ``"steps": 40`` are the same request,
    and fields the vendor's routes ignore do not count), with its surface and model. The surface is stored
    under ``"dialect"``, its name before 0013, so that hashes made before the rename still match."""
    canonical = {
        "dialect": surface.value,
        # which settings were left to their default is not hashed: hashes made before it was kept still match
        "params": params.model_dump(mode="json", exclude={"defaulted"}),
        "seed": seed,
        "webhook_url": webhook_url,
    }
    if webhook_secret is not None:  # absent, the hash stays what it was before the field existed
        canonical["webhook_secret"] = webhook_secret
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_webhook_url(url: str, policy: NetworkPolicy, timeout: float = WEBHOOK_RESOLVE_SECONDS) -> None:
    """Refuse (InvalidInput) a webhook_url whose host is, or resolves to, an address ``policy`` refuses.

    The name is resolved through the guard's own :func:`vet`, within ``timeout`` seconds; a name that does
    not resolve (yet) is left to delivery, which vets every attempt again. Runs in the caller's thread
    (FastAPI runs the sync submit routes in its thread pool, off the event loop)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as error:
        raise InvalidInput("webhook_url", f"not a usable URL ({error})") from None
    host = parts.hostname
    if not host:
        raise InvalidInput("webhook_url", "the URL has no host")
    loop = asyncio.new_event_loop()
    # Its own resolver thread, not waited for when the loop closes: a resolver that hangs past the
    # timeout costs a thread until it returns, never the request.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1, thread_name_prefix="fluxserve-resolve"))
    try:
        loop.run_until_complete(asyncio.wait_for(vet(host, port, policy), timeout))
    except AddressRefused as error:
        raise InvalidInput("webhook_url", str(error)) from None
    except (FetchError, TimeoutError):
        pass  # not resolvable now: delivery vets every attempt again
    finally:
        loop.close()
