"""The reseller's own format: ``POST /flux/generate`` (JSON) and ``POST /flux/edits`` (multipart).

``mode`` names the model: the table's name (``flux-kontext-pro``, ``flux-2-pro``) or the reseller's
``flux1-<name>`` for a FLUX.1 model (``flux1-dev`` is ``flux-dev``); ``model`` is accepted for ``mode``, as
the reseller's own example sends it. A mode whose model is not in the table is a 400 naming ``mode``.
``aspect_ratio`` (or the deprecated ``size``) becomes the model's aspect ratio, or a width and height within
its schema's range; ``hookUrl`` its webhook_url; uploaded ``image`` files its input images. The request is
then the model's own schema, so every rule and default is the table's, and the job is an ordinary reseller
job: the same envelope, fetch and webhook.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le, MultipleOf
from fastapi import APIRouter, Depends, File, Form, Header, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from starlette.concurrency import run_in_threadpool

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import reseller_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import ApiError
from fluxserve.api.requests import SCHEMAS, SubmitExtras, SubmitRequest, idempotency_key
from fluxserve.api.reseller import Envelope, submit
from fluxserve.api.reseller_schemas import SUBMIT_RESPONSES
from fluxserve.core.fields import (
    OptionalAspectRatio,
    Prompt,
    WebhookUrl,
    error_messages,
    input_image_field,
)
from fluxserve.core.models import MODELS, Dialect, Family, ModelSpec
from fluxserve.core.sizes import parse_aspect_ratio
from fluxserve.jobs.store import IDEMPOTENCY_HEADER

FLUX1_PREFIX = "flux1-"  # the reseller's name for the table's flux-<name> FLUX.1 models
TARGET_AREA = 1024 * 1024  # a width and height made from an aspect ratio have about one megapixel
# The model schema's names for this request's fields (so an error states the table's rule for it), and
# back: each error message names the field as this request does.
TABLE_NAMES = {"hookUrl": "webhook_url", "image": "input_image"}
NATIVE_NAMES = {"webhook_url": "hookUrl", "width": "aspect_ratio", "height": "aspect_ratio"}


def _schema(spec: ModelSpec) -> type[SubmitRequest] | None:
    """The model's reseller schema (its vendor one when the reseller has no route for it)."""
    return SCHEMAS[Dialect.RESELLER].get(spec.name) or SCHEMAS[Dialect.VENDOR].get(spec.name)


def _takes_a_prompt_alone(schema: type[SubmitRequest]) -> bool:
    return all(name == "prompt" or not info.is_required() for name, info in schema.model_fields.items())


def _modes() -> dict[str, ModelSpec]:
    """Every mode name and its model: the models that need nothing but a prompt (not fill or expand)."""
    modes: dict[str, ModelSpec] = {}
    for spec in MODELS.values():
        schema = _schema(spec)
        if schema is None or not _takes_a_prompt_alone(schema):
            continue
        modes[spec.name] = spec
        if spec.family is Family.FLUX1 and spec.name.count("-") == 1:  # flux-dev, not flux-pro-1.1
            modes[FLUX1_PREFIX + spec.name.removeprefix("flux-")] = spec
    return modes


MODES = _modes()


def spec_of_mode(mode: str) -> ModelSpec:
    spec = MODES.get(mode.strip())
    if spec is None:
        raise ApiError(400, f"mode: {mode[:100]!r} is not a model this server has; modes: {', '.join(MODES)}")
    return spec


def _native_name(field: str) -> str:
    if field.startswith("input_image") or field == "image_prompt":
        return "image"
    return NATIVE_NAMES.get(field, field)


def _renamed(lines: list[str]) -> str:
    """``field: rule`` lines under the request's own names (duplicates dropped: width and height are one
    aspect_ratio)."""
    named = []
    for line in lines:
        field, _, rule = line.partition(": ")
        named.append(f"{_native_name(field)}: {rule}" if rule else line)
    return "; ".join(dict.fromkeys(named))


def _native_messages(errors: list[dict[str, Any]]) -> str:
    """The table's rule for each field (``core.fields.RULES``), named as the request names it."""
    as_table = [
        {**error, "loc": tuple(TABLE_NAMES.get(str(part), part) for part in error.get("loc", ()))}
        for error in errors
    ]
    return _renamed(error_messages(as_table))


class NativeRoute(APIRoute):
    """Request validation errors become one 400 in the reseller's envelope, under the request's names."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise ApiError(400, _native_messages(list(exc.errors()))) from None

        return route


router = APIRouter(tags=["reseller"], route_class=NativeRoute)

Key = Annotated[ApiKey, Depends(reseller_key)]
Deps = Annotated[Services, Depends(get_services)]
Idempotency = Annotated[
    str | None,
    Header(alias=IDEMPOTENCY_HEADER, description="Optional: a repeat within 24 hours returns the same job."),
]
_MODE_DOC = "The model: " + ", ".join(MODES) + ". `model` is accepted for it."
Mode = Annotated[str, Field(json_schema_extra={"enum": list(MODES)}, description=_MODE_DOC)]
Size = Literal["1024x1024", "1024x1792", "1792x1024"] | None


class GenerateRequest(BaseModel):
    """``POST /flux/generate``; fields it does not have are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: Prompt = Field(description="What to draw.")
    mode: Mode = Field(validation_alias=AliasChoices("mode", "model"))
    aspect_ratio: OptionalAspectRatio = Field(
        default=None, description="W:H between 21:9 and 9:21; default 1:1."
    )
    size: Size = Field(
        default=None, json_schema_extra={"deprecated": True}, description="Deprecated: use aspect_ratio."
    )
    hookUrl: WebhookUrl = Field(default=None, description="Receives the fetch JSON when the job ends.")


def _bounds(info: FieldInfo) -> tuple[int, int | None, int]:
    """A dimension field's minimum, maximum and step, as its schema declares them."""
    low, high, step = 1, None, 16
    for item in info.metadata:
        if isinstance(item, Ge):
            low = int(item.ge)  # type: ignore[call-overload]
        elif isinstance(item, Le):
            high = int(item.le)  # type: ignore[call-overload]
        elif isinstance(item, MultipleOf):
            step = int(item.multiple_of)  # type: ignore[call-overload]
    return max(low, step), high, step


def _side(length: float, info: FieldInfo) -> int:
    low, high, step = _bounds(info)
    side = max(low, round(length / step) * step)
    return side if high is None else min(side, high // step * step)


def _ratio_text(aspect_ratio: str | None, size: str | None) -> str:
    """``aspect_ratio``, else the deprecated ``size`` as a ratio (``1024x1792`` -> ``4:7``), else 1:1."""
    if aspect_ratio:
        return aspect_ratio
    if size:
        width, height = (int(part) for part in size.split("x"))
        divisor = math.gcd(width, height)
        return f"{width // divisor}:{height // divisor}"
    return "1:1"


def _size_fields(schema: type[SubmitRequest], ratio_text: str | None) -> dict[str, Any]:
    """The model's own size fields for an aspect ratio: the ratio itself, or a width and height of about
    one megapixel within the schema's range (None: the model's default, e.g. follow the input image)."""
    fields = schema.model_fields
    if ratio_text is None:
        return {}
    if "aspect_ratio" in fields:
        return {"aspect_ratio": ratio_text}
    if "width" in fields and "height" in fields:
        ratio = parse_aspect_ratio(ratio_text)
        width = _side(math.sqrt(TARGET_AREA * ratio), fields["width"])
        return {"width": width, "height": _side(math.sqrt(TARGET_AREA / ratio), fields["height"])}
    return {}


def _image_slots(schema: type[SubmitRequest]) -> list[str]:
    """Where uploaded images go: the model's reference images, else its image prompt."""
    slots: list[str] = []
    while (name := input_image_field(len(slots))) in schema.model_fields:
        slots.append(name)
    return slots or [name for name in ("image_prompt",) if name in schema.model_fields]


def _request(schema: type[SubmitRequest], data: dict[str, Any]) -> SubmitRequest:
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise ApiError(400, _native_messages([dict(item) for item in error.errors()])) from None


def _submit(
    spec: ModelSpec, request: SubmitRequest, key: ApiKey, services: Services, idempotency: str | None
) -> Envelope:
    """The reseller's submit; a refused input (an undecodable image) named as this request names it."""
    try:
        return submit(spec, request, key, services, SubmitExtras(idempotency_key(idempotency)))
    except ApiError as error:
        if error.status_code == 400:
            raise ApiError(400, _renamed(error.message.split("; "))) from error
        raise


@router.post(
    "/flux/generate",
    summary="Generate an image (the reseller's own format; mode names the model)",
    responses=SUBMIT_RESPONSES,
)
def generate(body: GenerateRequest, key: Key, services: Deps, idempotency: Idempotency = None) -> Envelope:
    spec = spec_of_mode(body.mode)
    schema = _schema(spec)
    assert schema is not None  # MODES has only models with a schema
    ratio = _ratio_text(body.aspect_ratio, body.size)
    data = {"prompt": body.prompt, "webhook_url": body.hookUrl, **_size_fields(schema, ratio)}
    return _submit(spec, _request(schema, data), key, services, idempotency)


@router.post(
    "/flux/edits",
    summary="Edit images (multipart: one or more image files; mode names the model)",
    responses=SUBMIT_RESPONSES,
)
async def edits(
    image: Annotated[list[UploadFile], File(description="One or more images to edit or use as references.")],
    prompt: Annotated[Prompt, Form(description="What to change.")],
    mode: Annotated[Mode, Form()],
    key: Key,
    services: Deps,
    aspect_ratio: Annotated[OptionalAspectRatio, Form(description="W:H; default: the first image's.")] = None,
    hookUrl: Annotated[WebhookUrl, Form(description="Receives the fetch JSON when the job ends.")] = None,
    idempotency: Idempotency = None,
) -> Envelope:
    spec = spec_of_mode(mode)
    schema = _schema(spec)
    assert schema is not None
    slots = _image_slots(schema)
    if not slots:
        raise ApiError(400, f"image: {mode} does not take input images; use /flux/generate")
    if len(image) > len(slots):
        raise ApiError(400, f"image: {mode} takes at most {len(slots)} image(s), {len(image)} were sent")
    # Base64, as the model's schema takes them: the submitter decodes and checks each within its limits.
    images = {
        slot: base64.b64encode(await upload.read()).decode()
        for slot, upload in zip(slots, image, strict=False)
    }
    data = {"prompt": prompt, "webhook_url": hookUrl, **_size_fields(schema, aspect_ratio), **images}
    request = _request(schema, data)
    # Decoding and storing the images is blocking work: off the event loop.
    return await run_in_threadpool(_submit, spec, request, key, services, idempotency)
