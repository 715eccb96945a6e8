"""Each route's request schema, built from the model table: one pydantic model per model, for the reseller's
and the vendor's surfaces (the others fill the reseller's).

The table says which fields a route has and their defaults in each; ``core.fields`` says each
field's type and range, written as JSON Schema constraints so that ``/openapi.json`` states them. Both
surfaces ignore fields a route does not have, as both upstreams do (clients send supersets, such as
``aspect_ratio`` to flux-dev), while every known field is strict. Both turn into the same
:class:`~fluxserve.core.params.GenerationParams` with :meth:`SubmitRequest.to_params`.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from annotated_types import Ge, Le, MultipleOf
from fastapi import APIRouter, Depends, Header, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from fluxserve.accounts.keys import ApiKey
from fluxserve.api.deps import Services, get_services
from fluxserve.api.errors import readable_errors
from fluxserve.core.fields import FIELD_TYPES, OPTIONAL_TYPES, VARIANT_TYPES, Variant, input_image_field
from fluxserve.core.models import MODELS, REQUIRED, ModelSpec, SurfaceName
from fluxserve.core.params import ENTRY_SETTINGS, GenerationParams, ImageRef
from fluxserve.core.sizes import parse_aspect_ratio
from fluxserve.errors import InvalidInput, Refused
from fluxserve.jobs.store import IDEMPOTENCY_HEADER

_NOT_PARAMS = {"seed", "webhook_url", "webhook_secret"}


class SubmitRequest(BaseModel):
    """Base of every submit schema."""

    spec: ClassVar[ModelSpec]

    @model_validator(mode="before")
    @classmethod
    def _null_settings_not_named(cls, data: Any) -> Any:
        """``"steps": null`` is "not given" (``core.fields``): dropped here, so that the setting counts as
        left to its default (``GenerationParams.defaulted``) as when it is absent."""
        if isinstance(data, dict) and any(data.get(name, 0) is None for name in ENTRY_SETTINGS):
            return {
                name: value for name, value in data.items() if name not in ENTRY_SETTINGS or value is not None
            }
        return data

    def to_params(self) -> GenerationParams:
        data = self.model_dump(exclude=_NOT_PARAMS)
        data["defaulted"] = [
            name for name in ENTRY_SETTINGS if name in data and name not in self.model_fields_set
        ]
        images = [
            ImageRef(field=name, ref=ref) for name in self.spec.image_fields if (ref := data.pop(name, None))
        ]
        # A route without a prompt (erase) paints with the empty prompt.
        return GenerationParams(model=self.spec.name, input_images=images, **{"prompt": "", **data})

    @property
    def seed_value(self) -> int | None:
        return getattr(self, "seed", None)

    @property
    def webhook(self) -> str | None:
        return getattr(self, "webhook_url", None)


class ResellerRequest(SubmitRequest):
    """Unknown fields are ignored, numbers must be finite."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class VendorRequest(SubmitRequest):
    """Unknown fields are ignored, as the vendor does; a prompt is needed unless an image prompt is given."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="after")
    def _prompt_or_image(self) -> VendorRequest:
        images = getattr(self, "image_prompt", None) or getattr(self, "image", None)  # fill/expand: optional
        if not str(getattr(self, "prompt", "")).strip() and not images:
            raise PydanticCustomError("prompt_required", "prompt: is required (or give image_prompt)")
        return self


_BASES: dict[SurfaceName, type[SubmitRequest]] = {
    SurfaceName.RESELLER: ResellerRequest,
    SurfaceName.VENDOR: VendorRequest,
}


def _field(name: str, default: Any) -> tuple[Any, Any]:
    annotation, description = FIELD_TYPES[name]
    if isinstance(default, Variant):  # this route's own range for the field
        annotation, _, description = VARIANT_TYPES[default.kind]
        default = default.default
    if default is REQUIRED:
        return annotation, Field(description=description)
    if not default and name in OPTIONAL_TYPES:  # no aspect ratio: follow the input image; vendor prompt
        annotation = OPTIONAL_TYPES[name]
    return annotation, Field(default=default, description=description)


def _schema(spec: ModelSpec, surface: SurfaceName) -> type[SubmitRequest]:
    title = "".join(part.capitalize() for part in re.split(r"[-/]", spec.name.replace(".", "")))
    suffix = "Request" if surface is SurfaceName.RESELLER else "Inputs"
    # Any, not tuple[Any, Any]: mypy matches ``**fields`` against create_model's ``__config__`` & co too.
    fields: dict[str, Any] = {name: _field(name, default) for name, default in spec.fields[surface].items()}
    # Not ``schema = create_model(...)``: the pydantic mypy plugin types such a name as a new BaseModel.
    return _with_spec(
        create_model(f"{title}{suffix}", __base__=_BASES[surface], __doc__=spec.title, **fields), spec
    )


def _with_spec(schema: type[SubmitRequest], spec: ModelSpec) -> type[SubmitRequest]:
    schema.spec = spec
    return schema


SCHEMAS: dict[SurfaceName, dict[str, type[SubmitRequest]]] = {
    surface: {name: _schema(spec, surface) for name, spec in MODELS.items() if surface in spec.fields}
    for surface in SurfaceName
}


_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@dataclass(frozen=True)
class SubmitExtras:
    """What a submit takes from the request besides its body and key."""

    idempotency_key: str | None  # the Idempotency-Key header, checked: 1..255 visible ASCII characters


Submit = Callable[[ModelSpec, SubmitRequest, ApiKey, Services, SubmitExtras], object]


def add_submit_routes(
    router: APIRouter,
    surface: SurfaceName,
    prefix: str,
    key_dependency: Any,
    submit: Submit,
    **options: Any,
) -> None:
    """One ``POST {prefix}{model}`` route per model of the table, taking the model's schema in ``surface``,
    the key from ``key_dependency`` (an ``Annotated[ApiKey, Depends(...)]``), the optional
    ``Idempotency-Key`` header, and answered by ``submit``."""
    for spec in MODELS.values():
        if surface not in spec.fields or not spec.own_routes:
            continue
        router.add_api_route(
            f"{prefix}{spec.name}",
            _handler(spec, SCHEMAS[surface][spec.name], key_dependency, submit),
            methods=["POST"],
            summary=spec.title,
            name=f"{surface}_{spec.name}",
            **options,
        )


def idempotency_key(value: str | None) -> str | None:
    """The header's value, or a 400 naming it (rendered in each surface's error shape)."""
    if value is None or _IDEMPOTENCY_KEY.fullmatch(value):
        return value
    raise Refused(
        400, f"{IDEMPOTENCY_HEADER}: must be 1 to 255 visible ASCII characters (no spaces), e.g. a UUID"
    )


def _handler(
    spec: ModelSpec,
    schema: type[SubmitRequest],
    key_dependency: Any,
    submit: Submit,
) -> Callable[..., object]:
    def handler(
        body: SubmitRequest,
        key: ApiKey,
        services: Services,
        idempotency: str | None = None,
    ) -> object:
        return submit(spec, body, key, services, SubmitExtras(idempotency_key(idempotency)))

    # FastAPI reads the parameters' annotations: the body's schema and the dependencies are set here.
    handler.__annotations__ = {
        "body": schema,
        "key": key_dependency,
        "services": Annotated[Services, Depends(get_services)],
        "idempotency": Annotated[
            str | None,
            Header(
                alias=IDEMPOTENCY_HEADER,
                description="Optional: a repeat of the same request with the same key within 24 hours "
                "returns the same job, charged once.",
            ),
        ],
    }
    return handler


# Routes that take a model by name in the body (the reseller's /flux/generate and /flux/edits, the OpenAI
# images API) fill that model's own schema from their fields, with these.

TARGET_AREA = 1024 * 1024  # the area of a width and height made from an aspect ratio alone


def schema_of(spec: ModelSpec) -> type[SubmitRequest] | None:
    """The model's reseller schema, else its vendor one; None when it has neither."""
    return SCHEMAS[SurfaceName.RESELLER].get(spec.name) or SCHEMAS[SurfaceName.VENDOR].get(spec.name)


def needs_only_a_prompt(schema: type[SubmitRequest]) -> bool:
    """True for generation models; False for tools that require more (fill's image, say)."""
    return all(name == "prompt" or not info.is_required() for name, info in schema.model_fields.items())


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


def size_fields(
    schema: type[SubmitRequest], shape: tuple[int, int], area: int = TARGET_AREA
) -> dict[str, Any]:
    """The model's own size fields for a shape (``(16, 9)``, or ``(1792, 1024)``): its aspect ratio
    (``"16:9"``, ``"7:4"``), or a width and height of about ``area`` pixels in that ratio, scaled down to
    fit the range the schema declares for them and snapped to its step. ValueError for a ratio outside
    21:9..9:21."""
    divisor = math.gcd(*shape)
    ratio_text = f"{shape[0] // divisor}:{shape[1] // divisor}"
    ratio = parse_aspect_ratio(ratio_text)
    fields = schema.model_fields
    if "aspect_ratio" in fields:
        return {"aspect_ratio": ratio_text}
    if "width" not in fields or "height" not in fields:
        return {}
    (low_w, high_w, step_w), (low_h, high_h, step_h) = _bounds(fields["width"]), _bounds(fields["height"])
    width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
    scale = min(1.0, (high_w or width) / width, (high_h or height) / height)
    return {
        "width": max(low_w, int(width * scale / step_w) * step_w),
        "height": max(low_h, int(height * scale / step_h) * step_h),
    }


def upload_name(field: str) -> str:
    """What a route that takes ``image`` uploads calls a model field: its image slots are ``image``."""
    return "image" if field.startswith("input_image") or field == "image_prompt" else field


async def encoded_uploads(
    uploads: Sequence[UploadFile], slots: Sequence[str], max_bytes: int
) -> dict[str, str]:
    """Each upload as the base64 its slot takes (the submitter decodes and checks it). One larger than
    ``max_bytes`` is refused by the size the form parser counted while spooling it to disk, before a byte
    of it is read into memory."""
    for number, upload in enumerate(uploads, 1):
        if upload.size is not None and upload.size > max_bytes:
            raise InvalidInput(
                "image", f"file {number} is {upload.size} bytes; at most {max_bytes} are accepted"
            )
    return {
        slot: base64.b64encode(await upload.read()).decode()
        for slot, upload in zip(slots, uploads, strict=False)
    }


def image_slots(schema: type[SubmitRequest]) -> list[str]:
    """Where uploaded images go, in order: the model's reference images, else its image prompt."""
    slots: list[str] = []
    while (name := input_image_field(len(slots))) in schema.model_fields:
        slots.append(name)
    return slots or [name for name in ("image_prompt",) if name in schema.model_fields]


def refusing_routes(refusal: Callable[[list[dict[str, Any]]], Exception]) -> type[APIRoute]:
    """A route class for routers whose refusals have their own shape: a request that fails validation
    raises ``refusal(errors)`` instead of FastAPI's 422."""

    class RefusingRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    raise refusal(readable_errors(exc)) from None

            return route

    return RefusingRoute
