"""Turning a validated request into a durable job: seed, stored inputs, size, price, limits."""

from __future__ import annotations

import io
import secrets
import uuid
from dataclasses import dataclass

from fluxserve.accounts.keys import ApiKey
from fluxserve.core.catalog import KONTEXT_MODELS
from fluxserve.core.job import Job
from fluxserve.core.params import GenerationParams
from fluxserve.core.pricing import PRICES
from fluxserve.core.sizes import output_size
from fluxserve.jobs.store import JobStore
from fluxserve.safety.images import ImageInputError, decode_image_input, is_url
from fluxserve.storage.base import BlobStore

KONTEXT_IMAGE_TOLERANCE = 2
BLOB_PREFIX = "blob:"


class InvalidInput(ValueError):
    """A request that passed the schema but not a deeper check (an undecodable image, say)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field


def image_field(index: int) -> str:
    """The request field that carried ``input_images[index]``."""
    return "input_image" if index == 0 else f"input_image_{index + 1}"


@dataclass(frozen=True)
class Limits:
    max_active: int
    max_active_kontext_max: int
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
        image_fields: list[str] | None = None,
    ) -> Job:
        """Write the job (raising QuotaExceeded / TooManyActiveJobs / InvalidInput) and return it.

        ``image_fields`` names the request field of each input image, for error messages, when they
        are not simply ``input_image``, ``input_image_2``... in order.
        """
        fields = image_fields or [image_field(index) for index in range(len(params.input_images))]
        job_id = str(uuid.uuid4())
        reference: tuple[int, int] | None = None
        images: list[str] = []
        for index, value in enumerate(params.input_images):
            ref, size = self._store_image(job_id, fields[index], value)
            images.append(ref)
            if index == 0:
                reference = size
        image_prompt = None
        if params.image_prompt is not None:
            image_prompt, _ = self._store_image(job_id, "image_prompt", params.image_prompt)
        updates: dict[str, object] = {"input_images": images, "image_prompt": image_prompt}
        if params.model in KONTEXT_MODELS and images:
            updates["safety_tolerance"] = min(params.safety_tolerance, KONTEXT_IMAGE_TOLERANCE)
        params = params.model_copy(update=updates)
        size = output_size(params.model, params.width, params.height, params.aspect_ratio, reference)
        job = Job(
            id=job_id,
            key_id=key.id,
            model=params.model,
            params=params.model_dump(mode="json"),
            seed=seed if seed is not None else secrets.randbelow(2**32),
            output_format=params.output_format,
            prompt=params.prompt,
            cost=PRICES[params.model],
            width=size[0] if size else None,
            height=size[1] if size else None,
            webhook_url=webhook_url,
        )
        limit = self._limits.max_active
        if params.model == "flux-kontext-max":
            limit = self._limits.max_active_kontext_max
        return self._store.submit(job, limit)

    def _store_image(self, job_id: str, field: str, value: str) -> tuple[str, tuple[int, int] | None]:
        """Keep URLs for the worker to fetch; decode base64 now so a bad upload is a 400, not a failure."""
        if is_url(value):
            return value, None
        try:
            image = decode_image_input(
                value, field, max_bytes=self._limits.max_input_bytes, max_pixels=self._limits.max_input_pixels
            )
        except ImageInputError as error:
            raise InvalidInput(field, str(error).removeprefix(f"{field}: ")) from error
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = f"inputs/{job_id}/{field}.png"
        self._blobs.put(key, buffer.getvalue(), "image/png")
        return BLOB_PREFIX + key, image.size
