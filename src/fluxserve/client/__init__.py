"""Clients of HTTP APIs, importable without the engines (no torch, no diffusers): fluxserve's own
(:mod:`fluxserve.client.fluxserve`, exported here) and the vendor's (:mod:`fluxserve.client.vendor`, for the
relay engine)."""

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
