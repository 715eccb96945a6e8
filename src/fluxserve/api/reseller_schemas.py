"""One submit schema per reseller route: every field, type, range and default of the spec."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from fluxserve.api.fields import (
    AspectRatio,
    Dimension,
    Flag,
    Guidance,
    ImageInput,
    Interval,
    Optional,
    Prompt,
    SafetyTolerance,
    Seed,
    Steps,
    Strength,
    StrictRequest,
    WebhookUrl,
)
from fluxserve.core.params import GenerationParams

IMAGE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")
Format = Annotated[Literal["jpeg", "png"], Optional]


class _Common(StrictRequest):
    prompt: Prompt = Field(description="Text prompt for image generation.")
    seed: Seed = Field(default=None, description="Optional seed for reproducibility; random when absent.")
    output_format: Format = Field(default="png", description="Output format: 'jpeg' or 'png'.")
    prompt_upsampling: Flag = Field(default=False, description="Rewrite the prompt for more creative output.")
    safety_tolerance: SafetyTolerance = Field(default=2, description="0 (most strict) to 6 (least strict).")
    webhook_url: WebhookUrl = Field(default=None, description="Receives the fetch JSON when the job ends.")

    def to_params(self, model: str) -> GenerationParams:
        data = self.model_dump(exclude={"seed", "webhook_url"})
        images = [data.pop(name, None) for name in IMAGE_FIELDS]
        data["input_images"] = [image for image in images if image]
        return GenerationParams(model=model, **data)

    def image_fields(self) -> list[str]:
        """The names of the image fields that were sent, in the order of ``input_images``."""
        return [name for name in IMAGE_FIELDS if getattr(self, name, None)]


class KontextRequest(_Common):
    """flux-kontext-max and flux-kontext-pro: edit or create an image."""

    input_image: ImageInput = Field(default=None, description="Base64 image or URL to edit.")
    input_image_2: ImageInput = Field(default=None, description="Experimental multi-reference image.")
    input_image_3: ImageInput = Field(default=None, description="Experimental multi-reference image.")
    input_image_4: ImageInput = Field(default=None, description="Experimental multi-reference image.")
    aspect_ratio: AspectRatio | None = Field(default=None, description="Between 21:9 and 9:21.")


class UltraRequest(_Common):
    """flux-pro-1.1-ultra: ~4 MP images, optional raw mode."""

    aspect_ratio: AspectRatio = Field(default="1:1", description="Between 21:9 and 9:21.")
    image_prompt: ImageInput = Field(default=None, description="Optional image to remix (base64 or URL).")
    image_prompt_strength: Strength = Field(default=0.1, description="Blend of prompt (0) and image (1).")
    raw: Flag = Field(default=False, description="Less processed, more natural-looking images.")


class Pro11Request(_Common):
    """flux-pro-1.1."""

    image_prompt: ImageInput = Field(default=None, description="Optional image to remix (base64 or URL).")
    width: Dimension = Field(default=1024, description="Multiple of 32 in 256..1440.")
    height: Dimension = Field(default=768, description="Multiple of 32 in 256..1440.")


class DevRequest(Pro11Request):
    """flux-dev."""

    steps: Steps = Field(default=40, description="Denoising steps, 1..50.")
    guidance: Guidance = Field(default=2.5, description="Guidance scale, 1.5..5.")


class ProRequest(DevRequest):
    """flux-pro."""

    interval: Interval = Field(default=2, description="Guidance interval, 1..4.")


SCHEMAS: dict[str, type[_Common]] = {
    "flux-kontext-max": KontextRequest,
    "flux-kontext-pro": KontextRequest,
    "flux-pro-1.1-ultra": UltraRequest,
    "flux-pro-1.1": Pro11Request,
    "flux-pro": ProRequest,
    "flux-dev": DevRequest,
}
