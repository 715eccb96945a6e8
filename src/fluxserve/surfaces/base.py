"""What every surface is: its name, the paths it owns, its key header, and how it answers.

A :class:`Surface` renders, in its own shape: any refusal (:class:`~fluxserve.errors.RequestRefused`, with
the exception's own ``status_code``), a request that failed validation, any other error status (404, 405,
413, 500, 503), and a job (its fetch, the last event of its streams, its webhook). What a job's rendering
needs besides its row (a signed result URL, the queue position, a Replicate job's prediction) is passed in
as :class:`Links`, so that
nothing here imports a router or a store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from starlette.responses import JSONResponse

from fluxserve.core.job import JobRecord
from fluxserve.core.models import MODELS, SurfaceName
from fluxserve.core.prediction import Prediction
from fluxserve.core.pricing import format_credits, refused_price
from fluxserve.errors import (
    InvalidInput,
    KeyRefused,
    QuotaExceeded,
    Refused,
    RequestRefused,
    ServerBusy,
    TooManyActiveJobs,
)


class Links(Protocol):
    base_url: str  # the server's public URL (Replicate's ``urls`` are absolute)

    def result_url(self, key: str | None) -> str | None:
        """A URL the client can download the result at (signed, or the blob store's own), None for none."""
        ...

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs are ahead of this one, None when it is not queued."""
        ...

    def prediction_of(self, job: JobRecord) -> Prediction | None:
        """The Replicate prediction the job makes an output of, with its jobs; None for a job of none."""
        ...


class Surface(ABC):
    """One HTTP surface of the server. A subclass sets the class attributes and writes its error body, its
    validation error, its job rendering and its words for each refusal kind; one instance per surface."""

    name: ClassVar[SurfaceName]
    prefixes: ClassVar[tuple[str, ...]]  # the request paths it owns (``surfaces.for_path``: longest wins)
    # Its POST routes that make jobs (the guard checks their key before their body).
    submit_paths: ClassVar[frozenset[str]]
    key_header: ClassVar[str]  # where a client sends its API key
    model_prefix: ClassVar[str | None] = None  # its routes that name the model last (``/bfl/v1/<model>``)
    auth_status: ClassVar[int] = 401  # a missing or unknown key
    invalid_status: ClassVar[int] = 400  # a body the server will not parse (the vendor's FastAPI says 422)

    @abstractmethod
    def error_body(
        self, status_code: int, message: str, param: str | None, code: str | None
    ) -> dict[str, Any]:
        """An error's body in this surface's shape (``param`` and ``code`` where the shape has them)."""

    def error(
        self,
        status_code: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> JSONResponse:
        """An error in this surface's shape."""
        body = self.error_body(status_code, message, param, code)
        return JSONResponse(body, status_code=status_code, headers=headers)

    @abstractmethod
    def validation_error(self, errors: list[dict[str, Any]]) -> JSONResponse:
        """A request that failed its schema: pydantic's ``errors`` (``api.errors.readable_errors``)."""

    @abstractmethod
    def render_job(self, job: JobRecord, links: Links) -> dict[str, Any]:
        """A job as this surface shows it: its fetch JSON, its streams' last event, its webhook's body."""

    @abstractmethod
    def words(self, refused: RequestRefused) -> str:
        """The message of a refusal kind in this surface's words (a key, credits, limits, a full queue)."""

    def read_key(self, headers: Mapping[str, str]) -> str | None:
        """The API key a request sent (lower-case ``headers``, as ASGI's), None for none."""
        return headers.get(self.key_header.lower()) or None

    def http_message(self, status_code: int, detail: str) -> str:
        """What a plain HTTP error (a routing 404, a 405, a 413) says: Starlette's own words by default."""
        return detail

    def refusal(self, refused: RequestRefused, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """Any refusal, with the exception's own status: a router's own (:class:`Refused`), an invalid
        input (rendered as this surface renders a field's error), or a kind this surface words."""
        if isinstance(refused, Refused):
            return self.error(
                refused.status_code, refused.message, headers={**refused.headers, **(headers or {})},
                param=refused.param, code=refused.code,
            )  # fmt: skip
        if isinstance(refused, InvalidInput):
            return self.invalid_input(refused, headers)
        return self.error(refused.status_code, self.words(refused), headers=headers, code=code_of(refused))

    def invalid_input(self, refused: InvalidInput, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """A field that passed the schema but not a deeper check: 400 naming it."""
        return self.error(refused.status_code, str(refused), headers=headers, param=refused.field)


def bearer_token(authorization: str | None, schemes: tuple[str, ...] = ("bearer",)) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value (or another of ``schemes``, in lower
    case), else None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() not in schemes:
        return None
    return token.strip() or None


def code_of(refused: RequestRefused) -> str | None:
    """The OpenAI-style machine-readable code of a refusal kind (shapes without codes drop it)."""
    if isinstance(refused, KeyRefused):
        return "invalid_api_key"
    if isinstance(refused, QuotaExceeded):
        return "insufficient_quota"
    if isinstance(refused, TooManyActiveJobs):
        return "rate_limit_exceeded"
    return None


def price_of(refused: QuotaExceeded, unit: str = "") -> str:
    """What the refused job(s) cost, as a 402 says it (the model's lowest price when not quoted yet)."""
    spec = MODELS.get(refused.model or "")
    if spec is None:  # a refusal raised without its model: its price, if it was quoted
        return (
            "an unknown price"
            if refused.price is None
            else format_credits(refused.price * refused.count) + unit
        )
    return refused_price(spec, refused.price, refused.count, unit)


def busy(refused: RequestRefused) -> str | None:
    """A full queue's words, the same on every surface."""
    return f"Server busy: {refused}" if isinstance(refused, ServerBusy) else None
