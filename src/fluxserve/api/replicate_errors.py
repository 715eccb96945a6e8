"""Refusals of the Replicate surface (``api/replicate.py``) as Replicate words them: RFC 7807 problem details,
``{"title", "detail", "status"}``, and for invalid input a 422 with ``invalid_fields``:
``[{"type", "field", "description"}]``, each naming the input by its Replicate name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fluxserve.api.errors import responses
from fluxserve.api.requests import refusing_routes
from fluxserve.core.fields import error_messages


class ReplicateError(Exception):
    """A refusal as Replicate words it (RFC 7807 problem details)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        invalid_fields: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.invalid_fields = invalid_fields
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"title": self.title, "detail": self.detail, "status": self.status}
        if self.invalid_fields is not None:
            body["invalid_fields"] = self.invalid_fields
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A refusal made outside this router (a 404 path, a 413 body, the server busy) in Replicate's shape."""
    return ReplicateError(status, TITLES.get(status, "Error"), detail, headers=headers).response()


TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    402: "Insufficient credit",
    404: "Not found",
    413: "Request too large",
    422: "Input validation failed",
    429: "Too many requests",
    503: "Service unavailable",
}


def invalid(fields: list[tuple[str, str, str]]) -> ReplicateError:
    """422 naming each (field, kind, description)."""
    items = [{"type": kind, "field": field, "description": text} for field, kind, text in fields]
    detail = "".join(f"- {field}: {text}\n" for field, _, text in fields)
    return ReplicateError(422, TITLES[422], detail, items)


def invalid_fields(errors: list[dict[str, Any]], renamed: Mapping[str, str] | None = None) -> ReplicateError:
    """Pydantic's errors as one 422, each naming its field (``renamed``: this server's name -> the one
    the client sent) with the rule it broke."""
    found = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        ours = loc[0] if loc else "body"
        kind = "required" if error.get("type") == "missing" else str(error.get("type", "invalid"))
        message = error_messages([error])[0].removeprefix(f"{ours}: ")
        found.append(((renamed or {}).get(ours, ours), kind, message))
    return invalid(found)


async def render(_: Request, exc: Exception) -> JSONResponse:
    """The app's handler of :class:`ReplicateError` (``app.py`` installs it)."""
    assert isinstance(exc, ReplicateError)
    return exc.response()


ReplicateRoute = refusing_routes(invalid_fields)  # request validation errors as Replicate's 422


class InvalidField(BaseModel):
    type: str
    field: str
    description: str


class Problem(BaseModel):
    """Replicate's error shape (RFC 7807 problem details)."""

    title: str
    detail: str
    status: int
    invalid_fields: list[InvalidField] | None = None


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's refusals for ``/openapi.json``: each of ``statuses`` (and 401, 422) as a :class:`Problem`."""
    described: dict[int | str, str] = {
        status: TITLES.get(status, "Error") for status in sorted({401, 422, *statuses})
    }
    return responses(Problem, described)
