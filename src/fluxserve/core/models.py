"""The model table: what each API model *is*, one declarative entry per model.

An entry says everything the rest of the server needs to know about a model: its name (the route in
each surface that names it there: ``/bfl/v1/<name>`` and ``/v1/<name>``), the fields each such route
takes with its defaults, its price, its family, how its output size is decided, its active-job limit and the
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

from fluxserve.core.fields import IMAGE_FIELDS, REFERENCE_FIELDS, Variant
from fluxserve.core.sizes import SizeRule


class SurfaceName(StrEnum):
    """Which HTTP surface a request came in (``surfaces/``: one module each), as a job stores it: its
    results and webhooks are rendered by that surface. A model's ``fields`` are keyed by the two surfaces
    that name the model in the route; the others fill the reseller's schema."""

    RESELLER = "reseller"  # /bfl/v1/<model>, /flux/*, TT-API-KEY, the {"status","message","data"} envelope
    RESELLER_NATIVE = "reseller-native"  # the reseller's own format: /flux/generate, /flux/edits
    VENDOR = "vendor"  # /v1/<model>, x-key, the vendor's own shapes
    OPENAI = "openai"  # /v1/images/*, Authorization: Bearer, the OpenAI images API
    REPLICATE = "replicate"  # /v1/models/black-forest-labs/<replicate>/predictions (api/replicate.py)


class Family(StrEnum):
    FLUX1 = "flux1"  # text to image (FluxPipeline), image prompts through Redux or img2img
    KONTEXT = "kontext"  # FLUX.1 Kontext: edits of its input images, text to image without one
    FLUX2 = "flux2"  # FLUX.2 [pro]/[max]/[flex] (Flux2Pipeline): text to image, up to 8 references
    FLUX2_KLEIN = "flux2_klein"  # FLUX.2 [klein] (Flux2KleinPipeline): up to 4 references
    FILL = "fill"  # FLUX.1 Fill: repaint the masked part of ``image``, keep the rest (erase: no prompt)
    EXPAND = "expand"  # FLUX.1 Fill outpainting: grow ``image`` by its margins and paint the new area


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # a field default meaning "the client must send it"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    family: Family
    price: Decimal  # credits per image (1 credit = 0.01 USD), or for the first megapixel; as the vendor
    size_rule: SizeRule
    # per surface that names the model in its route: field name -> default (or REQUIRED, or a Variant:
    # another range on this route); a surface missing here has no route for the model
    fields: Mapping[SurfaceName, Mapping[str, Any]]
    further_mp_price: Decimal | None = None  # credits per further megapixel (FLUX.2); None: flat per image
    max_active: int | None = None  # its own limit of active jobs per key; None: the key's general limit
    upstream: str = ""  # the vendor endpoint (``/v1/<upstream>``) a relay sends it to; default: name
    # False: no ``/bfl/v1/<name>`` or ``/v1/<name>`` route; only the routes that name the model in the body
    # (``/flux/generate``, ``/flux/edits``, ``/v1/images/*``) take it, as the reseller lists flux1-schnell
    own_routes: bool = True
    # finetuned routes: the model whose catalog entry (weights, steps...) serves them unless the catalog
    # gives them their own, and the model name their finetunes are added for (``finetunes add --model``)
    base: str = ""
    finetunes_of: str = ""
    replicate: str = ""  # its name on Replicate (``black-forest-labs/<replicate>``); "": not served there
    image_fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = {name for fields in self.fields.values() for name in fields}
        object.__setattr__(self, "image_fields", tuple(name for name in IMAGE_FIELDS if name in names))
        if not self.upstream:
            object.__setattr__(self, "upstream", self.name)

    def vendor_fields(self) -> tuple[str, ...]:
        """The fields the vendor's endpoint takes for a generation (what a relay may forward); a model the
        vendor does not serve (flux-schnell) forwards its own fields to the endpoint an operator names."""
        fields = self.fields.get(SurfaceName.VENDOR) or next(iter(self.fields.values()))
        return tuple(name for name in fields if name not in _DELIVERY)


_DELIVERY = ("webhook_url", "webhook_secret")


def _fields(*groups: Mapping[str, Any], **more: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for group in groups:
        merged.update(group)
    merged.update(more)
    return merged


# The reseller's CDN serves WebP: its routes take webp beside jpeg and png.
_RESELLER = {
    "prompt": REQUIRED,
    "seed": None,
    "output_format": Variant("webp_format", "png"),
    "prompt_upsampling": False,
    "safety_tolerance": 2,
    "webhook_url": None,
}
# The vendor's published OpenAPI: jpeg unless kontext, an empty prompt allowed with an image prompt, and a
# webhook_secret that the job's webhook carries (webhooks/signing.py).
_VENDOR = {
    "prompt": "",
    "seed": None,
    "prompt_upsampling": False,
    "safety_tolerance": 2,
    "output_format": "jpeg",
    "webhook_url": None,
    "webhook_secret": None,
}
_SIZED = {"image_prompt": None, "width": 1024, "height": 768}
_KONTEXT = {**dict.fromkeys(REFERENCE_FIELDS[:4]), "aspect_ratio": None}
# FLUX.2 on the vendor (its API reference): prompt, up to 8 references (klein 4), width/height in steps of
# 16 or absent/0 to follow the first reference, safety 0..5; no prompt_upsampling but on flex.
_FLUX2_VENDOR = {
    **_VENDOR,
    "prompt": REQUIRED,
    **dict.fromkeys(REFERENCE_FIELDS),
    "width": Variant("flux2_side", None),
    "height": Variant("flux2_side", None),
    "safety_tolerance": Variant("flux2_safety", 2),
}
del _FLUX2_VENDOR["prompt_upsampling"]
_KLEIN_VENDOR = {name: value for name, value in _FLUX2_VENDOR.items() if name not in REFERENCE_FIELDS[4:]}
_FLEX_VENDOR = {
    **_FLUX2_VENDOR,
    "steps": 50,
    "guidance": Variant("flex_guidance", 5.0),
    "prompt_upsampling": True,
}
# The reseller's FLUX.2 routes keep its FLUX.1 field set with up to four input images.
_FLUX2_RESELLER = {**_RESELLER, **dict.fromkeys(REFERENCE_FIELDS[:4]), **_SIZED}
# The FLUX.1 tools the vendor's official client lists: fill (image + mask) and expand (margins in pixels).
_TOOL = {
    **_VENDOR,
    "image": REQUIRED,
    "steps": Variant("tool_steps", 50),
    "guidance": Variant("tool_guidance", 60.0),
}
_ULTRA = {"image_prompt": None, "image_prompt_strength": 0.1, "raw": False}
# The vendor's erase tool (its Flux2EraseInputs): no prompt (an erase instruction of its own), the mask
# required and grown by dilate_pixels (default 10, at most 25) before the area is painted over.
_ERASE = {
    **{name: value for name, value in _VENDOR.items() if name not in ("prompt", "prompt_upsampling")},
    "image": REQUIRED,
    "mask": REQUIRED,
    "dilate_pixels": 10,
    "safety_tolerance": Variant("flux2_safety", 2),
    "output_format": "png",
}

# The vendor's finetuned routes (its API reference): the base route's fields plus the finetune and its
# strength, whose default differs per route (pro 1.1, ultra 1.2; the FLUX.2 LoRA routes as pro).
_FINETUNE = {"finetune_id": REQUIRED}


def _kontext(name: str, title: str, price: str, max_active: int | None = None) -> ModelSpec:
    return ModelSpec(
        name=name,
        title=title,
        family=Family.KONTEXT,
        price=Decimal(price),
        size_rule=SizeRule.KONTEXT,
        max_active=max_active,
        replicate=name,
        fields={
            SurfaceName.RESELLER: _fields(_RESELLER, _KONTEXT),
            SurfaceName.VENDOR: _fields(_VENDOR, _KONTEXT, prompt=REQUIRED, output_format="png"),
        },
    )


def _flux2(
    name: str, title: str, price: str, further: str, vendor: Mapping[str, Any], family: Family = Family.FLUX2,
    reseller: Mapping[str, Any] | None = None, replicate: str = "",
) -> ModelSpec:  # fmt: skip
    fields = (
        {SurfaceName.VENDOR: vendor}
        if reseller is None
        else {SurfaceName.VENDOR: vendor, SurfaceName.RESELLER: reseller}
    )
    return ModelSpec(
        name=name,
        title=title,
        family=family,
        price=Decimal(price),
        further_mp_price=Decimal(further),
        size_rule=SizeRule.FLUX2,
        fields=fields,
        replicate=replicate,
    )


_ENTRIES = (
    _flux2(
        "flux-2-pro",
        "Generate or edit an image with FLUX.2 [pro]",
        "3",
        "1.5",
        _FLUX2_VENDOR,
        reseller=_FLUX2_RESELLER,
        replicate="flux-2-pro",
    ),
    _flux2(
        "flux-2-max",
        "Generate or edit an image with FLUX.2 [max]",
        "7",
        "3",
        _FLUX2_VENDOR,
        reseller=_FLUX2_RESELLER,
        replicate="flux-2-max",
    ),
    _flux2(
        "flux-2-flex",
        "Generate or edit an image with FLUX.2 [flex] (steps and guidance)",
        "5",
        "5",
        _FLEX_VENDOR,
        reseller=_fields(_FLUX2_RESELLER, steps=50, guidance=Variant("flex_guidance", 5.0)),
        replicate="flux-2-flex",
    ),
    _flux2("flux-2-pro-preview", "FLUX.2 [pro] preview", "3", "1.5", _FLUX2_VENDOR),
    _flux2(
        "flux-2-klein-4b",
        "Generate or edit an image with FLUX.2 [klein] 4B",
        "1.4",
        "0.1",
        _KLEIN_VENDOR,
        Family.FLUX2_KLEIN,
    ),
    _flux2(
        "flux-2-klein-9b",
        "Generate or edit an image with FLUX.2 [klein] 9B",
        "1.5",
        "0.2",
        _KLEIN_VENDOR,
        Family.FLUX2_KLEIN,
    ),
    _flux2(
        "flux-2-klein-9b-preview",
        "FLUX.2 [klein] 9B preview",
        "1.5",
        "0.2",
        {**_KLEIN_VENDOR, "output_format": Variant("webp_format", "jpeg")},  # the one that lists webp
        Family.FLUX2_KLEIN,
    ),
    ModelSpec(
        name="flux-pro-1.0-fill",
        title="Repaint the masked part of an image with FLUX.1 Fill [pro]",
        family=Family.FILL,
        price=Decimal("5"),
        size_rule=SizeRule.FILL,
        fields={SurfaceName.VENDOR: _fields(_TOOL, mask=None)},
    ),
    ModelSpec(
        name="flux-tools/erase-v1",
        title="Erase the masked object from an image (the fill pipeline, no prompt)",
        family=Family.FILL,
        price=Decimal("3"),
        further_mp_price=Decimal("0.4"),
        size_rule=SizeRule.FILL,
        fields={SurfaceName.VENDOR: _ERASE},
    ),
    ModelSpec(
        name="flux-pro-1.0-expand",
        title="Grow an image by pixels on each side with FLUX.1 Fill [pro]",
        family=Family.EXPAND,
        price=Decimal("5"),
        size_rule=SizeRule.EXPAND,
        fields={SurfaceName.VENDOR: _fields(_TOOL, top=0, bottom=0, left=0, right=0)},
    ),
    _kontext("flux-kontext-max", "Edit or create an image with FLUX.1 Kontext [max]", "8", max_active=6),
    _kontext("flux-kontext-pro", "Edit or create an image with FLUX.1 Kontext [pro]", "4"),
    ModelSpec(
        name="flux-pro-1.1-ultra",
        title="FLUX 1.1 [pro] ultra, optional raw mode",
        family=Family.FLUX1,
        price=Decimal("6"),
        size_rule=SizeRule.ULTRA,
        replicate="flux-1.1-pro-ultra",
        fields={
            SurfaceName.RESELLER: _fields(_RESELLER, _ULTRA, aspect_ratio="1:1"),
            SurfaceName.VENDOR: _fields(_VENDOR, _ULTRA, aspect_ratio="16:9"),
        },
    ),
    ModelSpec(
        name="flux-pro-1.1",
        title="FLUX 1.1 [pro]",
        family=Family.FLUX1,
        price=Decimal("4"),
        size_rule=SizeRule.WIDTH_HEIGHT,
        replicate="flux-1.1-pro",
        fields={
            SurfaceName.RESELLER: _fields(_RESELLER, _SIZED),
            SurfaceName.VENDOR: _fields(_VENDOR, _SIZED),
        },
    ),
    ModelSpec(
        name="flux-pro",
        title="FLUX.1 [pro]",
        family=Family.FLUX1,
        price=Decimal("5"),
        size_rule=SizeRule.WIDTH_HEIGHT,
        fields={
            SurfaceName.RESELLER: _fields(_RESELLER, _SIZED, steps=40, guidance=2.5, interval=2),
            SurfaceName.VENDOR: _fields(_VENDOR, _SIZED, steps=40, guidance=2.5, interval=2),
        },
    ),
    ModelSpec(
        name="flux-schnell",
        title="FLUX.1 [schnell]: open weights, 4 steps, no guidance",
        family=Family.FLUX1,
        price=Decimal("1"),
        size_rule=SizeRule.WIDTH_HEIGHT,
        fields={SurfaceName.RESELLER: _fields(_RESELLER, _SIZED)},
        own_routes=False,
    ),
    ModelSpec(
        name="flux-dev",
        title="FLUX.1 [dev]",
        family=Family.FLUX1,
        price=Decimal("2.5"),
        size_rule=SizeRule.WIDTH_HEIGHT,
        replicate="flux-dev",
        fields={
            SurfaceName.RESELLER: _fields(_RESELLER, _SIZED, steps=40, guidance=2.5),
            SurfaceName.VENDOR: _fields(_VENDOR, _SIZED, steps=28, guidance=3.0),
        },
    ),
)

_BASES = {spec.name: spec for spec in _ENTRIES}


def _finetuned(
    name: str, title: str, base: str, finetunes_of: str, vendor: Mapping[str, Any], price: str | None = None
) -> ModelSpec:
    """A vendor finetuned route: its base model's family, size rule and prices (unless the vendor prices
    it apart), and the base route's fields plus ``finetune_id`` and ``finetune_strength``."""
    spec = _BASES[base]
    return ModelSpec(
        name=name,
        title=title,
        family=spec.family,
        price=Decimal(price) if price else spec.price,
        further_mp_price=spec.further_mp_price,
        size_rule=spec.size_rule,
        fields={SurfaceName.VENDOR: vendor},
        base=base,
        finetunes_of=finetunes_of,
    )


_ULTRA_FINETUNED = {name: value for name, value in _fields(_VENDOR, _ULTRA).items() if name != "raw"}
_KLEIN_FINETUNED = {**_KLEIN_VENDOR, **_FINETUNE, "finetune_strength": 1.1}
_FINETUNED = (
    _finetuned(
        "flux-pro-finetuned",
        "FLUX.1 [pro] with a finetune (LoRA adapter)",
        "flux-pro",
        "flux-pro",
        _fields(_VENDOR, _FINETUNE, _SIZED, finetune_strength=1.1, steps=40, guidance=2.5),
        price="6",
    ),
    _finetuned(
        "flux-pro-1.1-ultra-finetuned",
        "FLUX 1.1 [pro] ultra with a finetune (LoRA adapter)",
        "flux-pro-1.1-ultra",
        "flux-pro",
        _fields(_ULTRA_FINETUNED, _FINETUNE, finetune_strength=1.2, aspect_ratio="16:9"),
        price="7",
    ),
    _finetuned(
        "flux-2-klein-4b-finetuned",
        "FLUX.2 [klein] 4B with a finetune (LoRA adapter)",
        "flux-2-klein-4b",
        "flux-2-klein-4b",
        _KLEIN_FINETUNED,
    ),
    _finetuned(
        "flux-2-klein-9b-finetuned",
        "FLUX.2 [klein] 9B with a finetune (LoRA adapter)",
        "flux-2-klein-9b",
        "flux-2-klein-9b",
        _KLEIN_FINETUNED,
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (*_ENTRIES, *_FINETUNED)}
# The model names finetunes are added for, with every name that selects them (``finetunes add --model``
# takes a finetuned route or its base too): flux-pro's serve both FLUX.1 finetuned routes, as the vendor's.
FINETUNE_TARGETS: dict[str, str] = {
    name: spec.finetunes_of for spec in _FINETUNED for name in (spec.name, spec.base, spec.finetunes_of)
}


def finetune_target(model: str) -> str:
    """The model name finetunes for ``model`` are added under; ValueError names the accepted ones."""
    try:
        return FINETUNE_TARGETS[model]
    except KeyError:
        known = ", ".join(sorted(set(FINETUNE_TARGETS.values())))
        raise ValueError(f"--model: {model!r} has no finetuned route (finetunes are for {known})") from None


def spec_of(model: str) -> ModelSpec:
    """The entry for an API model name; KeyError names the known ones."""
    try:
        return MODELS[model]
    except KeyError:
        raise KeyError(f"unknown model {model!r} (known: {', '.join(MODELS)})") from None
