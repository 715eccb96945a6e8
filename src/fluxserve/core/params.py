"""The dialect-independent generation request that a job carries from the API to an engine."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, field_validator

from fluxserve.core.fields import input_image_field

OutputFormat = Literal["jpeg", "png", "webp"]
# The settings a catalog entry may give its model (``steps``, ``guidance``): a request's own value wins, a
# route's documented default does not.
ENTRY_SETTINGS = ("steps", "guidance")
Number = TypeVar("Number", int, float)


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
    # finetuned routes: the adapter by name and weight as sent, and where its file is (set at submit,
    # ``blob:<key>`` or ``builtin:<name>``; see fluxserve.finetunes), so that a worker needs no lookup
    finetune_id: str | None = None
    finetune_strength: float | None = None
    finetune_file: str | None = None
    # which of ENTRY_SETTINGS the request left to its route's default (their values above are that default)
    defaulted: list[str] = Field(default_factory=list)

    def steps_for(self, entry: int | None, fallback: int) -> int:
        """The steps to run: the request's, else the catalog entry's (the model's own), else the route's
        default, else ``fallback`` (the engine's)."""
        return _setting(self.steps, "steps" in self.defaulted, entry, fallback)

    def guidance_for(self, entry: float | None, fallback: float) -> float:
        """The guidance to use, chosen as :meth:`steps_for` chooses steps."""
        return _setting(self.guidance, "guidance" in self.defaulted, entry, fallback)

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


def _setting(asked: Number | None, defaulted: bool, entry: Number | None, fallback: Number) -> Number:
    first, second = (entry, asked) if defaulted else (asked, entry)
    return first or second or fallback
