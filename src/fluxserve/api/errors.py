"""Errors in the reseller's shape: ``{"status":"FAILED","message":"<what and why>","data":null}``.

The vendor dialect (paths under ``/v1/``) keeps FastAPI's ``{"detail": ...}`` shape and 422s.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxserve.core.fields import error_messages

log = logging.getLogger("fluxserve.api")

VENDOR_PREFIX = "/v1/"


class ApiError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def failed(status_code: int, message: str) -> JSONResponse:
    return JSONResponse({"status": "FAILED", "message": message, "data": None}, status_code=status_code)


def _model_of(request: Request) -> str:
    return request.url.path.rstrip("/").rsplit("/", 1)[-1]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return failed(exc.status_code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith(VENDOR_PREFIX):
            return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
        return failed(400, "; ".join(error_messages(list(exc.errors()), _model_of(request))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if request.url.path.startswith(VENDOR_PREFIX):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        if exc.status_code == 413:
            return failed(413, "body: larger than this server accepts; send fewer or smaller images")
        return failed(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        message = "Internal server error; the request was not processed"
        if request.url.path.startswith(VENDOR_PREFIX):
            return JSONResponse({"detail": message}, status_code=500)
        return failed(500, message)
