"""One submit schema per vendor route (``POST /v1/<model>``): the vendor's own fields and defaults.

The vendor's published OpenAPI is the authority. Where its defaults differ from the reseller's they
differ here too (flux-dev: 28 steps, guidance 3; every non-kontext model: jpeg; ultra: 16:9), because a
client written against the vendor expects the vendor's images for the same request.

Like the vendor's own server, fields a model does not have are ignored rather than refused (clients
send ``aspect_ratio`` to flux-dev and get a 1024x768 image there too); the ones it has are checked with
the shared types of :mod:`fluxserve.api.fields`, so both dialects apply the same ranges.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from fluxserve.api.fields import (
    MAX_PROMPT_CHARS,
    RULES,
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
    WebhookUrl,
)
from fluxserve.core.params import GenerationParams

IMAGE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")

# The vendor also offers webp; our encoder writes jpeg and png only, so say so instead of "invalid".
VENDOR_RULES: dict[str, str] = {
    **RULES,
    "output_format": "must be 'jpeg' or 'png' (this server does not produce webp)",
    "prompt": f"must be a string of at most {MAX_PROMPT_CHARS} characters, non-empty unless "
    "image_prompt is given",
    "webhook_secret": "is not supported: webhooks from this server are signed with your key's own "
    "secret (Standard Webhooks headers webhook-id, webhook-timestamp, webhook-signature)",
}


def _refuse(value: str | None) -> str | None:
    if value is not None:
        raise ValueError("webhook_secret is not supported")
    return value


Format = Annotated[Literal["jpeg", "png"], Optional]
OptionalPrompt = Annotated[str, Optional, Field(max_length=MAX_PROMPT_CHARS)]
WebhookSecret = Annotated[str | None, AfterValidator(_refuse)]


class VendorRequest(BaseModel):
    """Fields common to every vendor route. Unknown fields are ignored, as the vendor does."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: OptionalPrompt = Field(default="", description="Text prompt for image generation.")
    seed: Seed = Field(default=None, description="Optional seed for reproducibility; random when absent.")
    prompt_upsampling: Flag = Field(default=False, description="Rewrite the prompt for more creative output.")
    safety_tolerance: SafetyTolerance = Field(default=2, description="0 (most strict) to 6 (least strict).")
    output_format: Format = Field(default="jpeg", description="'jpeg' or 'png'.")
    webhook_url: WebhookUrl = Field(default=None, description="Receives the result when the task ends.")
    webhook_secret: WebhookSecret = Field(
        default=None, description="Not supported: deliveries are signed with the key's webhook secret."
    )

    @model_validator(mode="after")
    def _prompt_or_image(self) -> VendorRequest:
        if not self.prompt.strip() and not getattr(self, "image_prompt", None):
            raise PydanticCustomError("prompt_required", "prompt: is required (or give image_prompt)")
        return self

    def to_params(self, model: str) -> GenerationParams:
        data = self.model_dump(exclude={"seed", "webhook_url", "webhook_secret"})
        images = [data.pop(name, None) for name in IMAGE_FIELDS]
        data["input_images"] = [image for image in images if image]
        return GenerationParams(model=model, **data)

    def image_fields(self) -> list[str]:
        """The names of the image fields that were sent, in the order of ``input_images``."""
        return [name for name in IMAGE_FIELDS if getattr(self, name, None)]


class KontextInputs(VendorRequest):
    """flux-kontext-pro and flux-kontext-max (the vendor's FluxKontextProInputs)."""

    prompt: Prompt = Field(description="Text prompt for image generation.")
    output_format: Format = Field(default="png", description="'jpeg' or 'png'.")
    input_image: ImageInput = Field(default=None, description="Base64 image or URL to edit.")
    input_image_2: ImageInput = Field(default=None, description="Experimental multi-reference image.")
    input_image_3: ImageInput = Field(default=None, description="Experimental multi-reference image.")
    input_image_4: ImageInput = Field(default=None, description="Experimental multi-reference image.")
    aspect_ratio: AspectRatio | None = Field(default=None, description="Between 21:9 and 9:21.")


class UltraInputs(VendorRequest):
    """flux-pro-1.1-ultra (the vendor's FluxUltraInput): 16:9 and jpeg unless asked otherwise."""

    aspect_ratio: AspectRatio = Field(default="16:9", description="Between 21:9 and 9:21.")
    raw: Flag = Field(default=False, description="Less processed, more natural-looking images.")
    image_prompt: ImageInput = Field(default=None, description="Optional image to remix (base64 or URL).")
    image_prompt_strength: Strength = Field(default=0.1, description="Blend of prompt (0) and image (1).")


class Pro11Inputs(VendorRequest):
    """flux-pro-1.1 (the vendor's FluxPro11Inputs)."""

    image_prompt: ImageInput = Field(default=None, description="Optional image for Flux Redux.")
    width: Dimension = Field(default=1024, description="Multiple of 32 in 256..1440.")
    height: Dimension = Field(default=768, description="Multiple of 32 in 256..1440.")


class DevInputs(Pro11Inputs):
    """flux-dev (the vendor's FluxDevInputs): 28 steps and guidance 3 by default."""

    steps: Steps = Field(default=28, description="Denoising steps, 1..50.")
    guidance: Guidance = Field(default=3.0, description="Guidance scale, 1.5..5.")


class ProInputs(Pro11Inputs):
    """flux-pro (the vendor's FluxProInputs): 40 steps, guidance 2.5, interval 2."""

    steps: Steps = Field(default=40, description="Denoising steps, 1..50.")
    guidance: Guidance = Field(default=2.5, description="Guidance scale, 1.5..5.")
    interval: Interval = Field(default=2, description="Guidance interval, 1..4.")


SCHEMAS: dict[str, type[VendorRequest]] = {
    "flux-kontext-max": KontextInputs,
    "flux-kontext-pro": KontextInputs,
    "flux-pro-1.1-ultra": UltraInputs,
    "flux-pro-1.1": Pro11Inputs,
    "flux-pro": ProInputs,
    "flux-dev": DevInputs,
}


class SubmitResponse(BaseModel):
    """What a submit returns: poll ``polling_url`` (absolute) until the task is Ready."""

    id: str
    polling_url: str
    cost: int | float | None = Field(
        description="Credits this task costs when it succeeds (1 credit = 0.01 USD)."
    )


VendorStatus = Literal[
    "Task not found", "Pending", "Request Moderated", "Content Moderated", "Ready", "Error"
]


class ResultResponse(BaseModel):
    """``GET /v1/get_result``: ``result`` is ``{"sample","prompt","seed",...}`` once Ready."""

    id: str
    status: VendorStatus
    result: dict[str, Any] | None = None
    progress: float | None = None
    details: dict[str, Any] | None = None


class CreditsResponse(BaseModel):
    credits: int | float = Field(
        description="The key's balance in credits; a large sentinel for unlimited keys."
    )
    unlimited: bool = Field(default=False, description="True for keys without a credit limit.")
