"""The model table: what each API model *is*, one declarative entry per model.

An entry says everything the rest of the server needs to know about a model: its name (the route in
each dialect: ``/bfl/v1/<name>`` and ``/v1/<name>``), the fields each dialect's route takes with that
dialect's defaults, its price, its family, how its output size is decided, its active-job limit and the
vendor endpoint a relay sends it to. Routes, request schemas, pricing, admission, size resolution, the
engines and the relay all read it; adding a model is one entry here plus its weights in the catalog.

Which engine and weights serve a model on one installation is not a fact about the model: that is the
catalog (``catalog.toml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

from fluxserve.core.fields import IMAGE_FIELDS
from fluxserve.core.sizes import SizeRule


class Dialect(StrEnum):
    RESELLER = "reseller"  # /bfl/v1/<model>, TT-API-KEY, the {"status","message","data"} envelope
    VENDOR = "vendor"  # /v1/<model>, x-key, the vendor's own shapes


class Family(StrEnum):
    FLUX1 = "flux1"  # text to image (FluxPipeline), image prompts through Redux or img2img
    KONTEXT = "kontext"  # FLUX.1 Kontext: edits of its input images, text to image without one


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a field default meaning "the client must send it"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    family: Family
    price: Decimal  # credits per image (1 credit = 0.01 USD), as the vendor prices it
    size_rule: SizeRule
    fields: Mapping[Dialect, Mapping[str, Any]]  # per dialect: field name -> default (or REQUIRED)
    max_active: int | None = None  # its own limit of active jobs per key; None: the key's general limit
    upstream: str = ""  # the vendor endpoint (``/v1/<upstream>``) a relay sends it to; default: name
    image_fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = {name for fields in self.fields.values() for name in fields}
        object.__setattr__(self, "image_fields", tuple(name for name in IMAGE_FIELDS if name in names))
        if not self.upstream:
            object.__setattr__(self, "upstream", self.name)

    def vendor_fields(self) -> tuple[str, ...]:
        """The fields the vendor's endpoint takes for a generation (what a relay may forward)."""
        return tuple(name for name in self.fields[Dialect.VENDOR] if name not in _DELIVERY)


_DELIVERY = ("webhook_url", "webhook_secret")


def _fields(*groups: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for group in groups:
        merged.update(group)
    merged.update(more)
    return merged


_RESELLER = {
    "prompt": REQUIRED,
    "seed": None,
    "output_format": "png",
    "prompt_upsampling": False,
    "safety_tolerance": 2,
    "webhook_url": None,
}
# The vendor's published OpenAPI: jpeg unless kontext, an empty prompt allowed with an image prompt, and a
# webhook_secret field (refused here: our deliveries are signed with the key's own secret).
_VENDOR = {
    "prompt": "",
    "seed": None,
    "prompt_upsampling": False,
    "safety_tolerance": 2,
    "output_format": "jpeg",
    "webhook_url": None,
    "webhook_secret": None,
}
_KONTEXT = {**dict.fromkeys(IMAGE_FIELDS), "aspect_ratio": None}
_SIZED = {"image_prompt": None, "width": 1024, "height": 768}
_ULTRA = {"image_prompt": None, "image_prompt_strength": 0.1, "raw": False}


def _kontext(name: str, title: str, price: str, max_active: int | None = None) -> ModelSpec:
    return ModelSpec(
        name=name,
        title=title,
        family=Family.KONTEXT,
        price=Decimal(price),
        size_rule=SizeRule.KONTEXT,
        max_active=max_active,
        fields={
            Dialect.RESELLER: _fields(_RESELLER, _KONTEXT),
            Dialect.VENDOR: _fields(_VENDOR, _KONTEXT, prompt=REQUIRED, output_format="png"),
        },
    )


_ENTRIES = (
    _kontext("flux-kontext-max", "Edit or create an image with FLUX.1 Kontext [max]", "8", max_active=6),
    _kontext("flux-kontext-pro", "Edit or create an image with FLUX.1 Kontext [pro]", "4"),
    ModelSpec(
        name="flux-pro-1.1-ultra",
        title="FLUX 1.1 [pro] ultra, optional raw mode",
        family=Family.FLUX1,
        price=Decimal("6"),
        size_rule=SizeRule.ULTRA,
        fields={
            Dialect.RESELLER: _fields(_RESELLER, _ULTRA, aspect_ratio="1:1"),
            Dialect.VENDOR: _fields(_VENDOR, _ULTRA, aspect_ratio="16:9"),
        },
    ),
    ModelSpec(
        name="flux-pro-1.1",
        title="FLUX 1.1 [pro]",
        family=Family.FLUX1,
        price=Decimal("4"),
        size_rule=SizeRule.WIDTH_HEIGHT,
        fields={Dialect.RESELLER: _fields(_RESELLER, _SIZED), Dialect.VENDOR: _fields(_VENDOR, _SIZED)},
    ),
    ModelSpec(
        name="flux-pro",
        title="FLUX.1 [pro]",
        family=Family.FLUX1,
        price=Decimal("5"),
        size_rule=SizeRule.WIDTH_HEIGHT,
        fields={
            Dialect.RESELLER: _fields(_RESELLER, _SIZED, steps=40, guidance=2.5, interval=2),
            Dialect.VENDOR: _fields(_VENDOR, _SIZED, steps=40, guidance=2.5, interval=2),
        },
    ),
    ModelSpec(
        name="flux-dev",
        title="FLUX.1 [dev]",
        family=Family.FLUX1,
        price=Decimal("2.5"),
        size_rule=SizeRule.WIDTH_HEIGHT,
        fields={
            Dialect.RESELLER: _fields(_RESELLER, _SIZED, steps=40, guidance=2.5),
            Dialect.VENDOR: _fields(_VENDOR, _SIZED, steps=28, guidance=3.0),
        },
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _ENTRIES}


def spec_of(model: str) -> ModelSpec:
    """The entry for an API model name; KeyError names the known ones."""
    try:
        return MODELS[model]
    except KeyError:
        raise KeyError(f"unknown model {model!r} (known: {', '.join(MODELS)})") from None
