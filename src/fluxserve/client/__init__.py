"""fluxserve's Python client (:mod:`fluxserve.client.fluxserve`, exported here), importable without the
engines (no torch, no diffusers). The vendor's API, which only the relay engine calls, is
:mod:`fluxserve.engines.relay.vendor_api`."""

from fluxserve.client.fluxserve import (
    AsyncClient,
    BadRequest,
    Client,
    Event,
    FluxserveError,
    Generation,
    InsufficientCredits,
    InvalidSignature,
    Job,
    JobFailed,
    NotFound,
    RateLimited,
    Retries,
    ServerError,
    Unauthorized,
    verify_webhook,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Event",
    "FluxserveError",
    "Generation",
    "InsufficientCredits",
    "InvalidSignature",
    "Job",
    "JobFailed",
    "NotFound",
    "RateLimited",
    "Retries",
    "ServerError",
    "Unauthorized",
    "verify_webhook",
]
