"""The vendor's own surface on the same jobs: ``POST /v1/<model>``, ``GET /v1/get_result``, ``/v1/credits``.

Clients written for the vendor's API (its official Python client among them) work unchanged when
pointed at this server with one of our keys in ``x-key``. Jobs are the ones the reseller's surface
sees: a job submitted here can be fetched at ``/flux/fetch`` and the other way round.

Errors keep the vendor's (FastAPI's) shapes: ``{"detail": "..."}`` for auth (403), credits (402) and
limits (429), and 422 ``{"detail": [{"loc", "msg", "type"}]}`` for invalid fields, with the same rules
and wording as the reseller's surface (``core/fields.RULES``); ``surfaces/vendor.py`` renders them.

One deliberate difference from the vendor's published contract, for safety: ``get_result`` needs the
submitting key in ``x-key`` (the vendor's OpenAPI marks it open), so that a key sees only its own jobs, as
in the reseller's surface. A task's ``webhook_secret`` is honoured as the vendor does (webhooks/signing.py),
beside the Standard Webhooks signature made with the key's own secret.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import vendor_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import VendorErrorBody, readable_errors, responses
from fluxserve.api.requests import SubmitExtras, SubmitRequest, add_submit_routes
from fluxserve.api.vendor_schemas import (
    CreditsResponse,
    DeleteFinetuneInputs,
    DeleteFinetuneResponse,
    FinetuneDetailResponse,
    MyFinetunesResponse,
    SubmitResponse,
)
from fluxserve.core.fields import MAX_ERROR_MESSAGES, VENDOR_RULES
from fluxserve.core.job import JobRecord
from fluxserve.core.models import ModelSpec, SurfaceName
from fluxserve.core.params import GenerationParams
from fluxserve.errors import InvalidInput, QuotaExceeded, Refused
from fluxserve.surfaces.vendor import ResultResponse, render_result

# /v1/credits for a key without a limit: the vendor's schema requires a number, and JSON has no
# infinity; a balance no job can exhaust keeps clients' "enough credits?" checks passing.
UNLIMITED_CREDITS = 1_000_000_000
MAX_INPUT_ECHO = 200  # longer inputs (base64 images) are not echoed back in validation errors


def vendor_errors(errors: list[dict[str, Any]], limit: int = MAX_ERROR_MESSAGES) -> list[dict[str, Any]]:
    """Pydantic's errors as the vendor's ``ValidationError`` items, with our rule as the message.

    Only JSON-safe keys are kept (pydantic's ``ctx`` may hold exception objects), and long inputs
    such as base64 images are not echoed back. Linear in the errors: at most ``limit`` distinct items
    (by location and message), then one ``... and N more`` item.
    """
    seen: set[tuple[str, str]] = set()
    items: list[dict[str, Any]] = []
    for err in errors:
        loc = [part for part in err.get("loc", ()) if isinstance(part, str | int)]
        kind = str(err.get("type", "value_error"))
        if kind == "prompt_required":
            loc, kind = ["body", "prompt"], "missing"
        field = str(loc[1]) if len(loc) > 1 and loc[0] == "body" else (str(loc[-1]) if loc else "body")
        if kind == "missing":
            msg = f"{field}: is required"
        elif kind == "field_rule":  # a range particular to this route (core.fields.VARIANT_TYPES)
            msg = f"{field}: {err.get('msg')}"
        elif kind == "json_invalid":  # api.errors.readable_errors says what and where
            loc, msg = ["body"], str(err.get("msg"))
        elif kind.startswith("json") or (loc == ["body"] and kind in ("model_attributes_type", "dict_type")):
            loc, msg = ["body"], "body: must be a JSON object"
        elif field in VENDOR_RULES:
            msg = f"{field}: {VENDOR_RULES[field]}"
        else:
            msg = f"{field[:MAX_INPUT_ECHO]}: {err.get('msg', 'is invalid')}"
        identity = (repr(loc)[:MAX_INPUT_ECHO], msg)
        if identity in seen:
            continue
        seen.add(identity)
        if len(items) >= limit:
            continue
        item: dict[str, Any] = {"loc": loc, "msg": msg, "type": kind}
        value = err.get("input")
        finite = not isinstance(value, float) or math.isfinite(value)  # NaN and Infinity are not JSON
        if (isinstance(value, int | float | bool) and finite) or (
            isinstance(value, str) and len(value) <= MAX_INPUT_ECHO
        ):
            item["input"] = value
        items.append(item)
    if len(seen) > len(items):
        more = len(seen) - len(items)
        items.append({"loc": ["body"], "msg": f"... and {more} more", "type": "too_many_errors"})
    return items


class VendorRoute(APIRoute):
    """Rewrites request validation errors into :func:`vendor_errors` before the app's handler renders
    them as ``{"detail": [...]}`` (the vendor's surface does, for every path it owns)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise RequestValidationError(vendor_errors(readable_errors(exc)), body=exc.body) from None

        return route


router = APIRouter(prefix="/v1", tags=["vendor"], route_class=VendorRoute)


Key = Annotated[ApiKey, Depends(vendor_key)]
Deps = Annotated[Services, Depends(get_services)]


def _number(value: Decimal) -> float | int:
    """Credits as a JSON number: 4 rather than 4.0, 2.5 as is."""
    return int(value) if value == value.to_integral_value() else float(value)


def polling_url(job: JobRecord, services: Services) -> str:
    return f"{services.base_url}/v1/get_result?id={job.id}"


def _finetuned(
    spec: ModelSpec, params: GenerationParams, key: ApiKey, services: Services
) -> GenerationParams:
    """On a finetuned route, the params with the finetune's file: 404 for a finetune the key cannot use
    (another key's reads as unknown), 422 naming ``finetune_id`` for one added for another model."""
    if not spec.finetunes_of or params.finetune_id is None or services.finetunes.upstream(spec.name):
        return params  # a relayed route's finetune is the vendor's: it resolves the id
    finetune = services.finetunes.find(params.finetune_id, key.id)
    if finetune is None:
        raise Refused(
            404,
            f"Finetune not found: {params.finetune_id!r} (GET /v1/my_finetunes lists this key's finetunes)",
        )
    if finetune.model != spec.finetunes_of:
        raise InvalidInput("finetune_id", f"{finetune.name} is for {finetune.model}, not {spec.finetunes_of}")
    return params.model_copy(update={"finetune_file": finetune.file})


def _submit(
    spec: ModelSpec, body: SubmitRequest, key: ApiKey, services: Services, extras: SubmitExtras
) -> SubmitResponse:
    params = _finetuned(spec, body.to_params(), key, services)
    try:
        job = services.submitter.submit(
            key, params, body.seed_value, body.webhook, SurfaceName.VENDOR,
            extras.idempotency_key, getattr(body, "webhook_secret", None),
        )  # fmt: skip
    except QuotaExceeded as error:  # the vendor's words name the balance: read now, not the cached key's
        now = services.keys.get(key.id)
        balance = None if now is None else now.credits
        raise QuotaExceeded(error.price, error.model, balance=balance) from error
    return SubmitResponse(
        id=job.id,
        polling_url=polling_url(job, services),
        cost=_number(job.cost),
        input_mp=None if job.input_mp is None else float(job.input_mp),
        output_mp=None if job.output_mp is None else float(job.output_mp),
    )


_AUTH_RESPONSES = responses(VendorErrorBody, {403: "Missing or invalid x-key"})
_SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_AUTH_RESPONSES,
    **responses(
        VendorErrorBody,
        {
            400: "A malformed Idempotency-Key header",
            402: "Not enough credits for this model",
            404: "The finetune_id is not one this key may use (finetuned routes)",
            413: "The body is larger than this server accepts",
            429: "Too many active tasks for this key",
        },
    ),
}


add_submit_routes(
    router, SurfaceName.VENDOR, "/", Key, _submit, response_model=SubmitResponse, responses=_SUBMIT_RESPONSES,
    response_model_exclude_none=True,  # input_mp and output_mp only where the model is priced by them
)  # fmt: skip


@router.get(
    "/get_result",
    summary="Get a task's status and result",
    response_model=ResultResponse,
    responses=_AUTH_RESPONSES,
)
def get_result(
    key: Key,
    services: Deps,
    task_id: Annotated[str, Query(alias="id", min_length=1, max_length=100, description="The task's id.")],
) -> JSONResponse:
    """A ready JSONResponse, as the reseller's fetch: no second validation of the model just built."""
    job_id = task_id.strip()
    result = render_result(services.jobs.get(job_id, key_id=key.id), job_id, services)
    return JSONResponse(result.model_dump(mode="json"))


@router.get(
    "/credits", summary="The key's credit balance", response_model=CreditsResponse, responses=_AUTH_RESPONSES
)
def credits(key: Key, services: Deps) -> CreditsResponse:
    """The balance read now, not the verified key's copy (which may be up to a second old)."""
    balance = services.keys.get(key.id) or key
    if balance.credits is None:
        return CreditsResponse(credits=UNLIMITED_CREDITS, unlimited=True)
    return CreditsResponse(credits=_number(balance.credits))


@router.get(
    "/my_finetunes",
    summary="The finetunes this key may use",
    response_model=MyFinetunesResponse,
    responses=_AUTH_RESPONSES,
)
def my_finetunes(key: Key, services: Deps) -> MyFinetunesResponse:
    """The names (``finetune_id``) of the key's own finetunes and of those every key may use."""
    return MyFinetunesResponse(finetunes=[finetune.name for finetune in services.finetunes.visible(key.id)])


_NOT_FOUND = responses(VendorErrorBody, {404: "No finetune of that name for this key"})


@router.get(
    "/finetune_details",
    summary="One finetune's details",
    response_model=FinetuneDetailResponse,
    responses={**_AUTH_RESPONSES, **_NOT_FOUND},
)
def finetune_details(
    key: Key,
    services: Deps,
    finetune_id: Annotated[str, Query(min_length=1, max_length=200, description="The finetune's name.")],
) -> FinetuneDetailResponse:
    finetune = services.finetunes.find(finetune_id.strip(), key.id)
    if finetune is None:
        raise Refused(404, f"Finetune not found: {finetune_id!r}")
    return FinetuneDetailResponse(finetune_details=finetune.details())


@router.post(
    "/delete_finetune",
    summary="Delete one of this key's finetunes",
    response_model=DeleteFinetuneResponse,
    responses={
        **_AUTH_RESPONSES,
        **_NOT_FOUND,
        **responses(VendorErrorBody, {400: "A body that cannot be read", 403: "A finetune every key shares"}),
    },
)
def delete_finetune(key: Key, services: Deps, body: DeleteFinetuneInputs) -> DeleteFinetuneResponse:
    """A key deletes its own finetunes; the ones every key shares are the operator's to remove
    (``fluxserve finetunes remove``)."""
    finetune = services.finetunes.find(body.finetune_id, key.id)
    if finetune is None:
        raise Refused(404, f"Finetune not found: {body.finetune_id!r}")
    if finetune.key_id is None:
        raise Refused(
            403,
            f"{finetune.name} is shared by every key; the operator removes it (fluxserve finetunes remove)",
        )
    services.finetunes.remove(finetune.name)
    return DeleteFinetuneResponse(
        status="success",
        message=f"Finetune {finetune.name} deleted",
        deleted_finetune_id=finetune.name,
        timestamp=datetime.now(UTC).isoformat(),
    )
