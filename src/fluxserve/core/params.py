"""The dialect-independent generation request that a job carries from the API to an engine."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

OutputFormat = Literal["jpeg", "png"]


class GenerationParams(BaseModel):
    """What a validated submit becomes, whichever dialect it came in.

    Defaults are applied by the dialect's schema, never here, so that each dialect keeps its own.
    Image inputs are references: ``blob:<key>`` for uploads stored at submit, or an http(s) URL that the
    worker fetches through the SSRF guard.
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
    input_images: list[str] = Field(default_factory=list)
    image_prompt: str | None = None
    image_prompt_strength: float | None = None
