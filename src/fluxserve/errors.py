"""Every error fluxserve raises on purpose, in one tree; each message is written for the user.

- :class:`RequestRefused`: a submit that is not accepted; the API answers with the status it carries
  (400 :class:`InvalidInput`, 402 :class:`QuotaExceeded`, 429 :class:`TooManyActiveJobs`, 503
  :class:`ServerBusy`).
- :class:`JobFailure`: ends an accepted job; the worker maps each kind to the job's outcome:
  :class:`Moderated` ends it moderated, :class:`JobCanceled` canceled, the rest failed with the message.
  An exception outside this tree is a bug: the job fails with "Internal error" and the log has the trace.
- :class:`BlobNotFound`: no stored file under a key.
"""

from __future__ import annotations

from decimal import Decimal


class FluxserveError(Exception):
    """Base of the tree."""


class RequestRefused(FluxserveError):
    status_code = 400


class InvalidInput(RequestRefused, ValueError):
    """A request that passed the schema but not a deeper check (an undecodable image, say)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field


class QuotaExceeded(RequestRefused):
    """The key's credits do not cover the job's price: ``price`` once the job was quoted (a FLUX.2 price
    counts its megapixels), None when the key could not cover even the model's lowest price."""

    status_code = 402

    def __init__(self, price: Decimal | None = None) -> None:
        super().__init__("not enough credits")
        self.price = price


class TooManyActiveJobs(RequestRefused):
    """The key already has its limit of queued and running jobs."""

    status_code = 429


class ServerBusy(RequestRefused):
    """The whole queue is at the operator's cap (``FLUXSERVE_MAX_QUEUED_JOBS``): try again shortly."""

    status_code = 503


class JobFailure(FluxserveError):
    """Ends a job as failed, with this message."""


class InputError(JobFailure, ValueError):
    """An input image that cannot be used; the message starts with the field's name."""


class FetchError(JobFailure):
    """A URL that may not or could not be fetched; the message says which rule or what failed."""


class AddressRefused(FetchError):
    """The network policy refuses the address a URL resolves to: final, a retry cannot change it."""


class EngineError(JobFailure):
    """A failure that is the request's or the engine's (bad weights, an upstream refusal...)."""


class UpstreamError(EngineError):
    """The upstream API a relay engine forwards to refused, failed or could not be reached; the message is
    written for the job's owner and never holds the upstream key."""


class Moderated(EngineError):
    """The prompt or an input (``kind="request"``) or the output (``kind="content"``) was blocked.

    The job ends moderated, with the reason, and is not charged.
    """

    def __init__(self, kind: str, reason: str = "") -> None:
        label = "Request Moderated" if kind == "request" else "Content Moderated"
        super().__init__(f"{label}: {reason}" if reason else label)
        self.kind = kind
        self.reason = reason


class JobCanceled(JobFailure):
    """Raised inside an engine when the job's cancel flag is seen between denoising steps."""


class BlobNotFound(FluxserveError, KeyError):
    """No blob under that key (never stored, or removed by retention)."""
