"""Turning a validated request into a durable job: seed, stored inputs, size, price, limits."""

from __future__ import annotations

import io
import secrets
import uuid
from dataclasses import dataclass

from fluxserve.accounts.keys import ApiKey
from fluxserve.core.job import Job
from fluxserve.core.models import Dialect, Family, spec_of
from fluxserve.core.params import GenerationParams, ImageRef
from fluxserve.core.sizes import output_size
from fluxserve.errors import InputError, InvalidInput
from fluxserve.jobs.store import JobStore
from fluxserve.safety.images import decode_image_input, is_url
from fluxserve.storage.base import BlobStore

KONTEXT_IMAGE_TOLERANCE = 2
BLOB_PREFIX = "blob:"


@dataclass(frozen=True)
class Limits:
    max_active: int  # queued plus running jobs of one key
    max_active_per_model: dict[str, int]  # operator overrides of the model table's own limits
    max_input_bytes: int
    max_input_pixels: int


class Submitter:
    def __init__(self, store: JobStore, blobs: BlobStore, limits: Limits) -> None:
        self._store = store
        self._blobs = blobs
        self._limits = limits

    def submit(
        self,
        key: ApiKey,
        params: GenerationParams,
        seed: int | None,
        webhook_url: str | None,
        dialect: Dialect,
    ) -> Job:
        """Write the job (raising QuotaExceeded / TooManyActiveJobs / InvalidInput) and return it."""
        spec = spec_of(params.model)
        job_id = str(uuid.uuid4())
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
        # A size that waits for a URL input is resolved by the worker once it has fetched the image.
        size = output_size(spec.size_rule, params, sizes[0] if sizes else None)
        job = Job(
            id=job_id,
            key_id=key.id,
            model=params.model,
            dialect=dialect,
            params=params.model_dump(mode="json"),
            seed=seed if seed is not None else secrets.randbelow(2**32),
            output_format=params.output_format,
            prompt=params.prompt,
            cost=spec.price,
            width=size[0] if size else None,
            height=size[1] if size else None,
            webhook_url=webhook_url,
        )
        model_limit = self._limits.max_active_per_model.get(spec.name, spec.max_active)
        return self._store.submit(job, self._limits.max_active, model_limit)

    def _store_image(self, job_id: str, field: str, value: str) -> tuple[str, tuple[int, int] | None]:
        """Keep URLs for the worker to fetch; decode base64 now so a bad upload is a 400, not a failure."""
        if is_url(value):
            return value, None
        try:
            image = decode_image_input(
                value, field, max_bytes=self._limits.max_input_bytes, max_pixels=self._limits.max_input_pixels
            )
        except InputError as error:
            raise InvalidInput(field, str(error).removeprefix(f"{field}: ")) from error
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = f"inputs/{job_id}/{field}.png"
        self._blobs.put(key, buffer.getvalue(), "image/png")
        return BLOB_PREFIX + key, image.size
