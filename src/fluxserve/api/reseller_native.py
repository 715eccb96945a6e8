"""The reseller's own format: ``POST /flux/generate`` (JSON) and ``POST /flux/edits`` (multipart).

``mode`` names the model: the table's name (``flux-kontext-pro``, ``flux-2-pro``) or the reseller's
``flux1-<name>`` for a FLUX.1 model (``flux1-dev`` is ``flux-dev``); ``model`` is accepted for ``mode``, as
the reseller's own example sends it. A mode whose model is not in the table is a 400 naming ``mode``.
``aspect_ratio`` (or the deprecated ``size``) becomes the model's aspect ratio, or a width and height within
its schema's range; ``hookUrl`` its webhook_url; uploaded ``image`` files its input images. The request is
then the model's own schema, so every rule and default is the table's; the job answers as a reseller job (the
same envelope, fetch and webhook) and is stored as this surface's (``reseller-native``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Header, UploadFile
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.auth import reseller_key
from fluxserve.api.deps import Services, get_services
from fluxserve.api.requests import (
    SubmitExtras,
    SubmitRequest,
    encoded_uploads,
    idempotency_key,
    image_slots,
    needs_only_a_prompt,
    refusing_routes,
    schema_of,
    size_fields,
    upload_name,
)
from fluxserve.api.reseller import Envelope, submit
from fluxserve.api.reseller_schemas import SUBMIT_RESPONSES
from fluxserve.core.fields import (
    OptionalAspectRatio,
    Prompt,
    Trimmed,
    WebhookUrl,
    error_messages,
)
from fluxserve.core.models import MODELS, Family, ModelSpec, SurfaceName
from fluxserve.errors import InvalidInput, Refused
from fluxserve.jobs.store import IDEMPOTENCY_HEADER

FLUX1_PREFIX = "flux1-"  # the reseller's name for the table's flux-<name> FLUX.1 models
# The model schema's names for this request's fields (so an error states the table's rule for it), and
# back: each error message names the field as this request does.
TABLE_NAMES = {"hookUrl": "webhook_url", "image": "input_image"}
NATIVE_NAMES = {"webhook_url": "hookUrl", "width": "aspect_ratio", "height": "aspect_ratio"}


def _modes() -> dict[str, ModelSpec]:
    """Every mode name and its model: the models that need nothing but a prompt (not fill or expand)."""
    modes: dict[str, ModelSpec] = {}
    for spec in MODELS.values():
        schema = schema_of(spec)
        if schema is None or not needs_only_a_prompt(schema):
            continue
        modes[spec.name] = spec
        if spec.family is Family.FLUX1 and spec.name.count("-") == 1:  # flux-dev, not flux-pro-1.1
            modes[FLUX1_PREFIX + spec.name.removeprefix("flux-")] = spec
    return modes


MODES = _modes()


def spec_of_mode(mode: str) -> ModelSpec:
    spec = MODES.get(mode)
    if spec is None:
        raise Refused(400, f"mode: {mode[:100]!r} is not a model this server has; modes: {', '.join(MODES)}")
    return spec


def _native_name(field: str) -> str:
    return NATIVE_NAMES.get(field, upload_name(field))


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


def _refusal(errors: list[dict[str, Any]]) -> Refused:
    """Request validation errors become one 400 in the reseller's envelope, under the request's names."""
    return Refused(400, _native_messages(errors))


router = APIRouter(tags=["reseller"], route_class=refusing_routes(_refusal))

Key = Annotated[ApiKey, Depends(reseller_key)]
Deps = Annotated[Services, Depends(get_services)]
Idempotency = Annotated[
    str | None,
    Header(alias=IDEMPOTENCY_HEADER, description="Optional: a repeat within 24 hours returns the same job."),
]
_MODE_DOC = "The model: " + ", ".join(MODES) + ". `model` is accepted for it."
Mode = Annotated[str, Trimmed, Field(json_schema_extra={"enum": list(MODES)}, description=_MODE_DOC)]
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


def _shape(aspect_ratio: str | None, size: str | None) -> tuple[int, int]:
    """``aspect_ratio`` (``16:9``), else the deprecated ``size`` (``1024x1792``), else 1:1."""
    if aspect_ratio:
        width, _, height = aspect_ratio.partition(":")
        return int(width), int(height)
    if size:
        width, _, height = size.partition("x")
        return int(width), int(height)
    return 1, 1


def _request(schema: type[SubmitRequest], data: dict[str, Any]) -> SubmitRequest:
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise Refused(400, _native_messages([dict(item) for item in error.errors()])) from None


def _submit(
    spec: ModelSpec, request: SubmitRequest, key: ApiKey, services: Services, idempotency: str | None
) -> Envelope:
    """The reseller's submit, as a job of this surface; a refused input (an undecodable image) named as
    this request names it."""
    extras = SubmitExtras(idempotency_key(idempotency))
    try:
        return submit(spec, request, key, services, extras, SurfaceName.RESELLER_NATIVE)
    except InvalidInput as error:
        raise InvalidInput(_native_name(error.field), error.rule) from error


@router.post(
    "/flux/generate",
    summary="Generate an image (the reseller's own format; mode names the model)",
    responses=SUBMIT_RESPONSES,
)
def generate(body: GenerateRequest, key: Key, services: Deps, idempotency: Idempotency = None) -> Envelope:
    spec = spec_of_mode(body.mode)
    schema = schema_of(spec)
    assert schema is not None  # MODES has only models with a schema
    shape = size_fields(schema, _shape(body.aspect_ratio, body.size))
    data = {"prompt": body.prompt, "webhook_url": body.hookUrl, **shape}
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
    schema = schema_of(spec)
    assert schema is not None
    slots = image_slots(schema)
    if not slots:
        raise Refused(400, f"image: {mode} does not take input images; use /flux/generate")
    if len(image) > len(slots):
        raise Refused(400, f"image: {mode} takes at most {len(slots)} image(s), {len(image)} were sent")
    images = await encoded_uploads(image, slots, services.submitter.max_input_bytes)
    shape = size_fields(schema, _shape(aspect_ratio, None)) if aspect_ratio else {}
    data = {"prompt": prompt, "webhook_url": hookUrl, **shape, **images}
    request = _request(schema, data)
    # Decoding and storing the images is blocking work: off the event loop.
    return await run_in_threadpool(_submit, spec, request, key, services, idempotency)
