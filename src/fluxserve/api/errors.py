"""The app's error handlers, and the models that declare each surface's error shape in ``/openapi.json``.

Every error is answered by the surface that owns the request's path (``surfaces.for_path``), in its own
shape: a refusal (any ``errors.RequestRefused``) with the exception's own status, a request that failed
validation, an HTTP error (404, 405, 413), a 500, and a 503 while the database is away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve.errors import RequestRefused
from fluxserve.jobs.outage import database_away
from fluxserve.surfaces import for_path
from fluxserve.surfaces.replicate import title

log = logging.getLogger("fluxserve.api")

# The openai SDKs retry 408, 409, 429 and 5xx unless told not to; a retried submit would be a second job.
NO_RETRY = {"x-should-retry": "false"}
# What a client is told while the database is away: a restart or failover takes seconds.
RETRY_AFTER_SECONDS = 2
DATABASE_AWAY = (
    "Service unavailable: the database cannot be reached right now; retry in a few seconds "
    "(a submit sent with an Idempotency-Key is safe to repeat)"
)


class ResellerErrorBody(BaseModel):
    """The reseller's error envelope."""

    status: Literal["FAILED"]
    message: str = Field(description="What was wrong and why; a field's name and its rule.")
    data: None


class VendorErrorBody(BaseModel):
    """The vendor's (FastAPI's) error shape for refusals other than invalid fields."""

    detail: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """The OpenAI API's error shape."""

    error: OpenAIErrorDetail


class InvalidField(BaseModel):
    type: str
    field: str
    description: str


class ReplicateErrorBody(BaseModel):
    """Replicate's error shape (RFC 7807 problem details); a 422 lists the inputs at fault."""

    title: str
    detail: str
    status: int
    invalid_fields: list[InvalidField] | None = None


def responses(model: type[BaseModel], described: Mapping[int | str, str]) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses`` for ``/openapi.json``: each status code it returns, with its body model."""
    return {status: {"model": model, "description": text} for status, text in described.items()}


def replicate_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A Replicate route's refusals for ``/openapi.json``: ``statuses`` (and 401, 422) as problem details."""
    return responses(ReplicateErrorBody, {status: title(status) for status in sorted({401, 422, *statuses})})


def invalid_json(error: json.JSONDecodeError) -> str:
    """A body that is not JSON, in words that say where (not FastAPI's "1: JSON decode error")."""
    return f"body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"


def readable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """``exc``'s errors, with FastAPI's JSON decode error (at ``("body", <offset>)``) in
    :func:`invalid_json`'s words at ``("body",)``; each surface's renderer shows its ``msg``."""
    errors = [dict(error) for error in exc.errors()]
    for error in errors:
        loc = error.get("loc", ())
        if error.get("type") == "json_invalid" and len(loc) == 2 and isinstance(exc.body, str):
            reason = str((error.get("ctx") or {}).get("error", "invalid"))
            error.update(loc=("body",), msg=invalid_json(json.JSONDecodeError(reason, exc.body, int(loc[1]))))
    return errors


def database_unavailable(path: str, exc: BaseException) -> JSONResponse:
    """The 503 for a request that met ``database_away``, in the shape of ``path``'s surface (logged
    without a traceback: an outage would write one per request)."""
    log.warning("database unavailable", extra={"path": path, "error": str(exc)[:300]})
    return for_path(path).error(503, DATABASE_AWAY, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _allow(request: Request, exc: StarletteHTTPException) -> str:
    """Every method of the path: Starlette's ``Allow`` names only those of the first route that matched
    it, and fetch has a route per method. Paths with parameters are not in this lookup and keep
    Starlette's."""
    operations = request.app.openapi()["paths"].get(request.url.path, {})
    methods = {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods)) or (exc.headers or {}).get("Allow", "")


def _models_beside(request: Request) -> list[str]:
    """The models of an unknown model route's surface (``/bfl/v1/<model>``, ``/v1/<model>``): the names
    of the submit routes next to it; none for any other path."""
    prefix = request.url.path.rsplit("/", 1)[0] + "/"
    if request.method != "POST" or prefix != for_path(request.url.path).model_prefix:
        return []
    paths = request.app.openapi()["paths"]
    return [
        path.removeprefix(prefix)
        for path, operations in paths.items()
        if path.startswith(prefix)
        and "/" not in path.removeprefix(prefix)
        and "post" in operations
        and "{" not in path
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused) -> JSONResponse:
        return for_path(request.url.path).refusal(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return for_path(request.url.path).validation_error(readable_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        surface = for_path(request.url.path)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allow(request, exc)
        if exc.status_code == 404 and (models := _models_beside(request)):
            name = request.url.path.rsplit("/", 1)[-1][:100]
            message = f"model: {name!r} is not a model this server has; models: {', '.join(models)}"
        else:
            message = surface.http_message(exc.status_code, str(exc.detail))
        return surface.error(exc.status_code, message, headers=headers)

    # SQLAlchemyError from the routes, and Exception from what runs outside them: one answer.
    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        if database_away(exc):
            return database_unavailable(request.url.path, exc)
        log.exception("unhandled error", extra={"path": request.url.path})
        return for_path(request.url.path).error(500, "Internal server error; the request was not processed")
