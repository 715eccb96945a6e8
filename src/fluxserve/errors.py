"""Every error fluxserve raises on purpose, in one tree; each message is written for the user.

Use it as a module (``from fluxserve import errors``): the root is :class:`Error`, as in ``sqlite3`` and
``psycopg``; the Python client's own tree is ``fluxserve.client.FluxserveError`` (what a client *receives*),
so no name here repeats one of its names.

- :class:`RequestRefused`: a request that is not accepted. Each carries its HTTP status
  (``status_code``); the API answers with that status in the shape of the request's surface
  (``surfaces/``: the surface renders it, once, for every router): 400 :class:`Refused` (a router's own
  refusal, worded there) and :class:`InvalidInput`, 401/403 :class:`KeyRefused`, 402 :class:`QuotaExceeded`,
  422 :class:`IdempotencyConflict` and :class:`InvalidFields` (Replicate's inputs), 429
  :class:`TooManyActiveJobs`, 503 :class:`ServerBusy`.
- :class:`JobFailure`: ends an accepted job; the worker maps each kind to the job's outcome:
  :class:`Moderated` ends it moderated, :class:`JobCanceled` canceled, the rest failed with the message.
  An exception outside this tree is a bug: the job fails with "Internal error" and the log has the trace.
- :class:`InvalidInput` is both: a bad input refused at submit (400), or found after it was accepted (a URL
  input fetched, a stored input gone), when it fails the job. One error on both sides of the queue.
- :class:`KeyProblem`: an operator's key command that cannot be done as asked (``fluxserve keys``).
- :class:`UndeliverableWebhook`: a webhook that can never be delivered (its job is gone).
- :class:`BlobNotFound`: no stored file under a key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal


class Error(Exception):
    """Root of the tree."""


class RequestRefused(Error):
    """A request that is not accepted; ``status_code`` is the HTTP status it is answered with."""

    status_code = 400


class Refused(RequestRefused):
    """A refusal a router words itself (a missing job id, an unknown job): its status and message, and
    for the surfaces whose error shape has them, the field at fault (``param``), a machine-readable
    ``code`` and extra response ``headers``."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


class JobFailure(Error):
    """Ends a job as failed, with this message."""


class InvalidInput(RequestRefused, JobFailure, ValueError):
    """A value that passed the schema but not a deeper check (an undecodable image, an unusable
    webhook_url): ``"<field>: <rule>"``. Refused with 400 at submit; once the job is accepted (a URL input
    fetched later), it fails the job with the same message."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class InvalidFields(RequestRefused):
    """Several inputs at fault at once, each ``(field, kind, description)`` by the name the client sent:
    Replicate's 422 lists them all (``invalid_fields``); the other surfaces read the joined message."""

    status_code = 422

    def __init__(self, fields: Sequence[tuple[str, str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {text}" for field, _, text in fields))
        self.fields = list(fields)


class KeyRefused(RequestRefused):
    """No key, or not a live one: 401, or the status the request's surface answers it with (the vendor's
    403). ``missing`` tells the two apart (each surface words them)."""

    status_code = 401

    def __init__(self, missing: bool, status_code: int = 401) -> None:
        super().__init__("the API key is missing" if missing else "the API key is not valid")
        self.missing = missing
        self.status_code = status_code


class QuotaExceeded(RequestRefused):
    """The key's credits do not cover the job's price: ``price`` once the job was quoted (a FLUX.2 price
    counts its megapixels), None when the key could not cover even the model's lowest price. ``model``,
    ``count`` (jobs in one request) and ``balance`` are what the surfaces' messages name, where known."""

    status_code = 402

    def __init__(
        self,
        price: Decimal | None = None,
        model: str | None = None,
        *,
        count: int = 1,
        balance: Decimal | None = None,
    ) -> None:
        super().__init__("not enough credits")
        self.price = price
        self.model = model
        self.count = count
        self.balance = balance


class IdempotencyConflict(RequestRefused):
    """The key's Idempotency-Key was used within 24 hours for a different request."""

    status_code = 422

    def __init__(self) -> None:
        super().__init__(
            "Idempotency-Key: already used in the last 24 hours for a different request (another "
            "body, model or dialect); send the same request to get its job again, or use a new key"
        )


class TooManyActiveJobs(RequestRefused):
    """The key already has its limit of queued and running jobs."""

    status_code = 429


class ServerBusy(RequestRefused):
    """The whole queue is at the operator's cap (``FLUXSERVE_MAX_QUEUED_JOBS``): try again shortly."""

    status_code = 503


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


class KeyProblem(Error):
    """An operation on keys that cannot be done as asked; the message says why, for the operator."""


class UndeliverableWebhook(Error):
    """A webhook that can never be delivered (its job's row is gone): recorded as failed, not retried."""


class BlobNotFound(Error, KeyError):
    """No blob under that key (never stored, or removed by retention)."""
