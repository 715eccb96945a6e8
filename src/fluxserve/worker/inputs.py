"""Loading a job's stored input images; URL inputs were fetched and stored before it was queued."""

from __future__ import annotations

from PIL import Image

from fluxserve.errors import InvalidInput
from fluxserve.jobs.submit import BLOB_PREFIX
from fluxserve.safety.images import decode_image_bytes
from fluxserve.storage.base import BlobStore


class InputLoader:
    def __init__(self, blobs: BlobStore, max_pixels: int) -> None:
        self._blobs = blobs
        self._max_pixels = max_pixels

    def load(self, ref: str, field: str) -> Image.Image:
        """Raises InvalidInput (or BlobNotFound) with a message that names the field."""
        if not ref.startswith(BLOB_PREFIX):  # the fetch stage stores every URL before the job is queued
            raise InvalidInput(field, "the input was not stored before the job was queued")
        return decode_image_bytes(self._blobs.get(ref.removeprefix(BLOB_PREFIX)), field, self._max_pixels)
