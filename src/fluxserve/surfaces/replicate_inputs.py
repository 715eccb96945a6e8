"""Each model's inputs as Replicate publishes them (names, ranges, defaults; docs/replicate.md says where each
came from), and how they become the fields of the model's own schema (``api/requests.py``), which then
checks them as every other surface's are.

Unknown inputs are ignored, as Replicate ignores them; a known one out of its range is refused by its
Replicate name. What this server cannot honour is accepted and documented: ``output_quality`` and
``go_fast`` change nothing, ``webp`` is written as PNG and ``jpg`` as JPEG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from fluxserve.core.fields import MAX_SAFETY, MAX_SEED, Prompt, input_image_field
from fluxserve.core.models import MODELS, ModelSpec

OWNER = "black-forest-labs"
Ratio = Literal["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
Quality = Annotated[
    int, Field(ge=0, le=100, description="Accepted; the server's encoder sets its own quality.")
]
Seed = Annotated[int | None, Field(default=None, ge=0, le=MAX_SEED, description="Random seed.")]
ImageUri = Annotated[
    str, Field(min_length=1, description="An http(s) URL, a data URI, or a file's urls.get.")
]
FORMATS = {"webp": "png", "jpg": "jpeg", "png": "png"}  # Replicate's output_format -> this server's
MEGAPIXELS = {"1": 1024 * 1024, "0.25": 512 * 512}
RESOLUTIONS = {"0.5 MP": 512 * 1024, "1 MP": 1024 * 1024, "2 MP": 2048 * 1024, "4 MP": 2048 * 2048}
DEFAULT_AREA = 1024 * 1024
# ``api.requests.size_fields`` for the model's schema: (aspect W, H) and an area -> its size fields
Shape = Callable[[tuple[int, int], int], dict[str, Any]]
SIDE_STEP = 32  # Replicate rounds a custom width and height to the nearest multiple of this


class ReplicateInput(BaseModel):
    """The inputs every model has; a subclass per model family adds its own."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    many: ClassVar[bool] = False  # the output is a list of URLs (num_outputs), else one URL
    renamed: ClassVar[dict[str, str]] = {}  # this server's field -> the input an error about it names

    prompt: Prompt
    seed: Seed = None

    @property
    def outputs(self) -> int:
        return 1

    def images(self) -> dict[str, str]:
        """The image inputs, by this server's field name."""
        return {}

    def fields(self, shape: Shape) -> dict[str, Any]:
        """This server's fields for the model (its schema checks them), sized with ``shape``."""
        raise NotImplementedError


def _format(name: str) -> str:
    return FORMATS[name]


def _shape(ratio: str) -> tuple[int, int]:
    width, height = ratio.split(":")
    return int(width), int(height)


def _rounded(side: int) -> int:
    return max(SIDE_STEP, round(side / SIDE_STEP) * SIDE_STEP)


class FluxDevInput(ReplicateInput):
    """black-forest-labs/flux-dev (Replicate's cog-flux ``DevPredictor`` and the model's API page)."""

    many: ClassVar[bool] = True
    renamed: ClassVar[dict[str, str]] = {
        "steps": "num_inference_steps", "image_prompt": "image", "image_prompt_strength": "prompt_strength",
        "width": "aspect_ratio", "height": "aspect_ratio",
    }  # fmt: skip

    aspect_ratio: Ratio = "1:1"
    image: ImageUri | None = None
    prompt_strength: Annotated[float, Field(ge=0, le=1)] = 0.8
    num_outputs: Annotated[int, Field(ge=1, le=4)] = 1
    num_inference_steps: Annotated[int, Field(ge=1, le=50)] = 28
    guidance: Annotated[float, Field(ge=0, le=10)] = 3
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: Quality = 80
    megapixels: Literal["1", "0.25"] = "1"
    go_fast: bool = True
    disable_safety_checker: bool = False

    @property
    def outputs(self) -> int:
        return self.num_outputs

    def images(self) -> dict[str, str]:
        return {} if self.image is None else {"image_prompt": self.image}

    def fields(self, shape: Shape) -> dict[str, Any]:
        return {
            **shape(_shape(self.aspect_ratio), MEGAPIXELS[self.megapixels]),
            # left out when not given, so the model's schema fills them as its default (the same values)
            **({"steps": self.num_inference_steps} if "num_inference_steps" in self.model_fields_set else {}),
            **({"guidance": self.guidance} if "guidance" in self.model_fields_set else {}),
            "output_format": _format(self.output_format),
            # Replicate's strength is the share of the image destroyed; this server's, the share kept
            "image_prompt_strength": 1 - self.prompt_strength,
            # The most lenient tolerance asked for; the worker caps every tolerance at the operator's floor
            # (``FLUXSERVE_MODERATION``), so this never goes past it.
            **({"safety_tolerance": MAX_SAFETY} if self.disable_safety_checker else {}),
        }


class Flux11ProInput(ReplicateInput):
    """black-forest-labs/flux-1.1-pro (the model's API page, version 96ccd0e7)."""

    image_prompt: ImageUri | None = None
    aspect_ratio: Ratio | Literal["custom"] = "1:1"
    width: Annotated[int, Field(ge=256, le=1440)] | None = None
    height: Annotated[int, Field(ge=256, le=1440)] | None = None
    safety_tolerance: Annotated[int, Field(ge=1, le=6)] = 2
    prompt_upsampling: bool = False
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: Quality = 80

    def images(self) -> dict[str, str]:
        return {} if self.image_prompt is None else {"image_prompt": self.image_prompt}

    def fields(self, shape: Shape) -> dict[str, Any]:
        if self.aspect_ratio == "custom":
            size = {"width": _rounded(self.width or 1024), "height": _rounded(self.height or 1024)}
        else:
            size = shape(_shape(self.aspect_ratio), DEFAULT_AREA)
        return {
            **size,
            "safety_tolerance": self.safety_tolerance,
            "prompt_upsampling": self.prompt_upsampling,
            "output_format": _format(self.output_format),
        }


class UltraInput(ReplicateInput):
    """black-forest-labs/flux-1.1-pro-ultra (the model's API page, version 352185db)."""

    image_prompt: ImageUri | None = None
    image_prompt_strength: Annotated[float, Field(ge=0, le=1)] = 0.1
    aspect_ratio: Ratio = "1:1"
    safety_tolerance: Annotated[int, Field(ge=1, le=6)] = 2
    raw: bool = False
    output_format: Literal["jpg", "png"] = "jpg"

    def images(self) -> dict[str, str]:
        return {} if self.image_prompt is None else {"image_prompt": self.image_prompt}

    def fields(self, shape: Shape) -> dict[str, Any]:
        return {
            "aspect_ratio": self.aspect_ratio,
            "image_prompt_strength": self.image_prompt_strength,
            "safety_tolerance": self.safety_tolerance,
            "raw": self.raw,
            "output_format": _format(self.output_format),
        }


class KontextInput(ReplicateInput):
    """black-forest-labs/flux-kontext-pro and -max (the pro model's API page, version 0a138193)."""

    input_image: ImageUri | None = None
    aspect_ratio: Ratio | Literal["match_input_image"] = "match_input_image"
    prompt_upsampling: bool = False
    output_format: Literal["jpg", "png"] = "png"
    safety_tolerance: Annotated[int, Field(ge=0, le=6)] = 2

    def images(self) -> dict[str, str]:
        return {} if self.input_image is None else {"input_image": self.input_image}

    def fields(self, shape: Shape) -> dict[str, Any]:
        ratio = None if self.aspect_ratio == "match_input_image" else self.aspect_ratio
        if ratio is None and self.input_image is None:
            ratio = "1:1"  # nothing to match: the default shape
        return {
            "aspect_ratio": ratio,
            "prompt_upsampling": self.prompt_upsampling,
            "safety_tolerance": self.safety_tolerance,
            "output_format": _format(self.output_format),
        }


class Flux2Input(ReplicateInput):
    """black-forest-labs/flux-2-pro, -max and -flex (the pro model's API page, versions 2aea4586 and
    00b07c32; flex's, 74299cd6)."""

    renamed: ClassVar[dict[str, str]] = {input_image_field(index): "input_images" for index in range(8)}

    input_images: Annotated[list[ImageUri], Field(max_length=8)] = []
    aspect_ratio: Ratio | Literal["match_input_image", "custom"] = "1:1"
    resolution: Literal["0.5 MP", "1 MP", "2 MP", "4 MP", "match_input_image"] = "1 MP"
    width: Annotated[int, Field(ge=256, le=2048)] | None = None
    height: Annotated[int, Field(ge=256, le=2048)] | None = None
    safety_tolerance: Annotated[int, Field(ge=1, le=5)] = 2
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: Quality = 80

    def images(self) -> dict[str, str]:
        return {input_image_field(index): image for index, image in enumerate(self.input_images)}

    def fields(self, shape: Shape) -> dict[str, Any]:
        if self.aspect_ratio == "custom":
            size: dict[str, Any] = {
                "width": _rounded(self.width or 1024),
                "height": _rounded(self.height or 1024),
            }
        elif self.aspect_ratio == "match_input_image" and self.input_images:
            size = {}  # FLUX.2 follows its first reference
        else:
            ratio = "1:1" if self.aspect_ratio == "match_input_image" else self.aspect_ratio
            size = shape(_shape(ratio), RESOLUTIONS.get(self.resolution, DEFAULT_AREA))
        return {
            **size,
            "safety_tolerance": self.safety_tolerance,
            "output_format": _format(self.output_format),
        }


class Flux2FlexInput(Flux2Input):
    """flux-2-flex: prompt upsampling on by default (its API page, version 74299cd6)."""

    prompt_upsampling: bool = True

    def fields(self, shape: Shape) -> dict[str, Any]:
        return {**super().fields(shape), "prompt_upsampling": self.prompt_upsampling}


INPUTS: dict[str, type[ReplicateInput]] = {
    "flux-dev": FluxDevInput,
    "flux-pro-1.1": Flux11ProInput,
    "flux-pro-1.1-ultra": UltraInput,
    "flux-kontext-pro": KontextInput,
    "flux-kontext-max": KontextInput,
    "flux-2-pro": Flux2Input,
    "flux-2-max": Flux2Input,
    "flux-2-flex": Flux2FlexInput,
}
# Replicate's name -> the model table's entry, for the models this server serves there
SERVED: dict[str, ModelSpec] = {spec.replicate: spec for spec in MODELS.values() if spec.replicate}
assert all(spec.name in INPUTS for spec in SERVED.values()), "a model with a Replicate name needs its inputs"
