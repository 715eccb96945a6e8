"""Errors in each dialect's own shape, and the models that declare those shapes in ``/openapi.json``.

- Reseller (``/bfl/v1/``, ``/flux/``): ``{"status":"FAILED","message":"<what and why>","data":null}``.
- Vendor (``/v1/`` but not ``/v1/images/``): FastAPI's ``{"detail": ...}`` shape and 422s.
- OpenAI images (``/v1/images/``): ``{"error": {"message", "type", "param", "code"}}``.
- Replicate (``/v1/predictions``, ``/v1/models/``, ``/v1/files``, ``/v1/webhooks/``): ``{"title", "detail",
  "status"}`` (``api/replicate_errors.py`` adds ``invalid_fields``).

:func:`error_response` is the one renderer, by path; the app's handlers and the request guard use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve.core.fields import error_messages
from fluxserve.errors import ServerBusy
from fluxserve.jobs.outage import database_away

log = logging.getLogger("fluxserve.api")

VENDOR_PREFIX = "/v1/"
RESELLER_MODEL_PREFIX = "/bfl/v1/"
OPENAI_PREFIX = "/v1/images/"
REPLICATE_PREFIXES = ("/v1/predictions", "/v1/models/", "/v1/files", "/v1/webhooks/")  # api/replicate.py
# The openai SDKs retry 408, 409, 429 and 5xx unless told not to; a retried submit would be a second job.
NO_RETRY = {"x-should-retry": "false"}
# What a client is told while the database is away: a restart or failover takes seconds.
RETRY_AFTER_SECONDS = 2
DATABASE_AWAY = (
    "Service unavailable: the database cannot be reached right now; retry in a few seconds "
    "(a submit sent with an Idempotency-Key is safe to repeat)"
)


class ApiError(Exception):
    """A refusal in the reseller's envelope."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class OpenAIError(Exception):
    """A refusal in the OpenAI images API's shape; ``param`` names the request field at fault."""

    def __init__(
        self,
        status_code: int,
        message: str,
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


class ResellerError(BaseModel):
    """The reseller's error envelope."""

    status: Literal["FAILED"]
    message: str = Field(description="What was wrong and why; a field's name and its rule.")
    data: None


class VendorError(BaseModel):
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


def responses(model: type[BaseModel], described: Mapping[int | str, str]) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses`` for ``/openapi.json``: each status code it returns, with its body model."""
    return {status: {"model": model, "description": text} for status, text in described.items()}


def failed(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    content = {"status": "FAILED", "message": message, "data": None}
    return JSONResponse(content, status_code=status_code, headers=headers)


def openai_error(
    status_code: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    kind = "server_error" if status_code >= 500 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status_code, headers=headers)


def error_response(
    path: str, status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error in the dialect that ``path`` belongs to."""
    if path.startswith(OPENAI_PREFIX):
        return openai_error(status_code, message, headers=headers)
    if path.startswith(REPLICATE_PREFIXES):  # Replicate's problem details
        body = {"title": HTTPStatus(status_code).phrase, "detail": message, "status": status_code}
        return JSONResponse(body, status_code=status_code, headers=headers)
    if path.startswith(VENDOR_PREFIX):
        return JSONResponse({"detail": message}, status_code=status_code, headers=headers)
    return failed(status_code, message, headers)


def invalid_json(error: json.JSONDecodeError) -> str:
    """A body that is not JSON, in words that say where (not FastAPI's "1: JSON decode error")."""
    return f"body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"


def readable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """``exc``'s errors, with FastAPI's JSON decode error (at ``("body", <offset>)``) in
    :func:`invalid_json`'s words at ``("body",)``; each dialect's renderer shows its ``msg``."""
    errors = [dict(error) for error in exc.errors()]
    for error in errors:
        loc = error.get("loc", ())
        if error.get("type") == "json_invalid" and len(loc) == 2 and isinstance(exc.body, str):
            reason = str((error.get("ctx") or {}).get("error", "invalid"))
            error.update(loc=("body",), msg=invalid_json(json.JSONDecodeError(reason, exc.body, int(loc[1]))))
    return errors


def database_unavailable(path: str, exc: BaseException) -> JSONResponse:
    """The 503 for a request that met ``database_away``, in ``path``'s dialect (logged without a
    traceback: an outage would write one per request)."""
    log.warning("database unavailable", extra={"path": path, "error": str(exc)[:300]})
    return error_response(path, 503, DATABASE_AWAY, {"Retry-After": str(RETRY_AFTER_SECONDS)})


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
    """The models of an unknown model route's dialect (``/bfl/v1/<model>``, ``/v1/<model>``): the names
    of the submit routes next to it; none for any other path."""
    prefix = request.url.path.rsplit("/", 1)[0] + "/"
    if request.method != "POST" or prefix not in (RESELLER_MODEL_PREFIX, VENDOR_PREFIX):
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
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return failed(exc.status_code, exc.message)

    @app.exception_handler(OpenAIError)
    async def openai_api_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return openai_error(exc.status_code, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(ServerBusy)
    async def server_busy(request: Request, exc: ServerBusy) -> JSONResponse:
        return error_response(request.url.path, 503, f"Server busy: {exc}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        messages = "; ".join(error_messages(readable_errors(exc)))
        if path.startswith(OPENAI_PREFIX):
            return openai_error(400, messages)
        if path.startswith(VENDOR_PREFIX):
            return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
        return failed(400, messages)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allow(request, exc)
        if exc.status_code == 413 and not request.url.path.startswith(VENDOR_PREFIX):
            message = "body: larger than this server accepts; send fewer or smaller images"
        elif exc.status_code == 404 and (models := _models_beside(request)):
            name = request.url.path.rsplit("/", 1)[-1][:100]
            message = f"model: {name!r} is not a model this server has; models: {', '.join(models)}"
        else:
            message = str(exc.detail)
        return error_response(request.url.path, exc.status_code, message, headers)

    # SQLAlchemyError from the routes, and Exception from what runs outside them: one answer.
    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        if database_away(exc):
            return database_unavailable(request.url.path, exc)
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(request.url.path, 500, "Internal server error; the request was not processed")
