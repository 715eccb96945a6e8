"""Resolving a job's image references (stored uploads or URLs) into decoded images."""

from __future__ import annotations

import asyncio

from PIL import Image

from fluxserve.jobs.submit import BLOB_PREFIX
from fluxserve.safety.fetch import NetworkPolicy, fetch_bytes
from fluxserve.safety.images import decode_image_bytes
from fluxserve.storage.base import BlobStore


class InputLoader:
    def __init__(
        self, blobs: BlobStore, policy: NetworkPolicy, max_bytes: int, max_pixels: int, timeout: float = 20.0
    ) -> None:
        self._blobs = blobs
        self._policy = policy
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._timeout = timeout

    def load(self, ref: str, field: str) -> Image.Image:
        """Raises FetchError or InputError with a message that names the field."""
        if ref.startswith(BLOB_PREFIX):
            data = self._blobs.get(ref.removeprefix(BLOB_PREFIX))
        else:
            data = asyncio.run(fetch_bytes(ref, self._policy, self._max_bytes, self._timeout))
        return decode_image_bytes(data, field, self._max_pixels)
