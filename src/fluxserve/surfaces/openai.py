"""The OpenAI images API's surface: ``/v1/images/generations`` and ``/v1/images/edits`` with
``Authorization: Bearer <key>``; errors as ``{"error": {"message", "type", "param", "code"}}``. That API has
no job object: its jobs read as the reseller's fetch JSON (``/flux/fetch`` and ``/flux/events`` show them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from fluxserve.core.fields import error_messages
from fluxserve.core.job import JobRecord
from fluxserve.core.models import SurfaceName
from fluxserve.errors import KeyRefused, QuotaExceeded, RequestRefused, TooManyActiveJobs
from fluxserve.surfaces.base import Links, Surface, bearer_token, busy, price_of
from fluxserve.surfaces.reseller import render_job

NO_BEARER = "You didn't provide an API key: send it as 'Authorization: Bearer <key>'"
BAD_BEARER = "Incorrect API key provided"


class OpenAISurface(Surface):
    name = SurfaceName.OPENAI
    prefixes = ("/v1/images/",)
    submit_paths = frozenset({"/v1/images/generations", "/v1/images/edits"})
    key_header = "Authorization"

    def error_body(
        self, status_code: int, message: str, param: str | None, code: str | None
    ) -> dict[str, Any]:
        kind = "server_error" if status_code >= 500 else "invalid_request_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def validation_error(self, errors: list[dict[str, Any]]) -> JSONResponse:
        return self.error(400, "; ".join(error_messages(errors)))

    def render_job(self, job: JobRecord, links: Links) -> dict[str, Any]:
        return render_job(job, links)

    def read_key(self, headers: Mapping[str, str]) -> str | None:
        return bearer_token(headers.get("authorization"))

    def words(self, refused: RequestRefused) -> str:
        if isinstance(refused, KeyRefused):
            return NO_BEARER if refused.missing else BAD_BEARER
        if isinstance(refused, QuotaExceeded):
            return f"Not enough credits: {refused.count} x {refused.model} costs {price_of(refused)}"
        if isinstance(refused, TooManyActiveJobs):
            return "Too many active jobs for this key; wait for some to finish"
        return busy(refused) or str(refused)


OPENAI = OpenAISurface()
