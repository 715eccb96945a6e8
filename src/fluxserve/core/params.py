"""The dialect-independent generation request that a job carries from the API to an engine."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from fluxserve.core.fields import input_image_field

OutputFormat = Literal["jpeg", "png", "webp"]


class ImageRef(BaseModel):
    """One input image and the request field it came in: the name goes with it to every error message
    and to the relay, so ``input_image`` + ``input_image_3`` stay those two names."""

    field: str
    ref: str  # ``blob:<key>`` for an upload stored at submit, or an http(s) URL the worker fetches


class GenerationParams(BaseModel):
    """What a validated submit becomes, whichever dialect it came in.

    Defaults are applied by the dialect's schema (from the model table), never here, so that each
    dialect keeps its own.
    """

    model: str
    prompt: str
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None
    output_format: OutputFormat = "png"
    steps: int | None = None
    guidance: float | None = None
    interval: float | None = None
    raw: bool = False
    prompt_upsampling: bool = False
    safety_tolerance: int = 2
    input_images: list[ImageRef] = Field(default_factory=list)
    image_prompt: str | None = None
    image_prompt_strength: float | None = None
    # expand: pixels added on each side (the image and a fill's mask travel in input_images, by field)
    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0
    dilate_pixels: int = 0  # erase: pixels the mask grows by before the area is painted over

    @field_validator("input_images", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        """Jobs stored before images carried their field name listed bare references, in field order."""
        if isinstance(value, list):
            return [
                {"field": input_image_field(index), "ref": item} if isinstance(item, str) else item
                for index, item in enumerate(value)
            ]
        return value
