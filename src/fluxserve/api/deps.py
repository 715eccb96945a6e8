"""What the routers need, handed over by ``app.py`` through ``app.state.services``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from fastapi import Request

from fluxserve.accounts.keys import KeyStore
from fluxserve.core.job import JobRecord
from fluxserve.core.prediction import Prediction
from fluxserve.finetunes.store import FinetuneStore
from fluxserve.jobs.predictions import PredictionStore
from fluxserve.jobs.store import Submissions
from fluxserve.jobs.submit import Submitter
from fluxserve.storage.base import BlobStore
from fluxserve.storage.signing import UrlSigner


@dataclass
class Services:
    keys: KeyStore
    jobs: Submissions
    submitter: Submitter
    blobs: BlobStore
    signer: UrlSigner
    base_url: str
    finetunes: FinetuneStore
    predictions: PredictionStore  # Replicate's predictions (api/replicate.py)

    def result_url(self, key: str | None) -> str | None:
        """The store's own URL when it gives one (an S3 presigned URL), else fluxserve's signed /files."""
        if key is None:
            return None
        return self.blobs.direct_url(key, self.signer.ttl_seconds) or self.base_url + self.signer.sign(key)

    def queue_position(self, job_id: str) -> int | None:
        """The jobs ahead of a queued one; with ``result_url``, what ``surfaces.Links`` asks for."""
        return self.jobs.queue_position(job_id)

    def prediction_of(self, job: JobRecord) -> Prediction | None:
        """The Replicate prediction the job makes an output of, with its jobs; None for a job of none."""
        return None if job.prediction_id is None else self.predictions.get(job.prediction_id)


async def get_services(request: Request) -> Services:
    """Async, so that FastAPI calls it on the event loop rather than in a thread of its pool."""
    return cast(Services, request.app.state.services)
