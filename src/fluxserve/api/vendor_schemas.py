"""The vendor surface's response shapes (its published OpenAPI); request schemas come from the model
table (``api/requests.py``), the result's from its renderer (``surfaces/vendor.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SubmitResponse(BaseModel):
    """What a submit returns: poll ``polling_url`` (absolute) until the task is Ready."""

    id: str
    polling_url: str
    cost: int | float | None = Field(
        description="Credits this task costs when it succeeds (1 credit = 0.01 USD)."
    )
    input_mp: float | None = Field(
        default=None, description="Megapixels of input images charged for (megapixel-priced models)."
    )
    output_mp: float | None = Field(
        default=None, description="Megapixels of the output charged for (megapixel-priced models)."
    )


class CreditsResponse(BaseModel):
    credits: int | float = Field(
        description="The key's balance in credits; a large sentinel for unlimited keys."
    )
    unlimited: bool = Field(default=False, description="True for keys without a credit limit.")


class MyFinetunesResponse(BaseModel):
    finetunes: list[str] = Field(description="The finetune_id of each finetune this key may use.")


class FinetuneDetailResponse(BaseModel):
    finetune_details: dict[str, Any] = Field(
        description="The finetune's model, scope (this key or all keys), LoRA rank, size and checksum."
    )


class DeleteFinetuneInputs(BaseModel):
    model_config = ConfigDict(extra="ignore")

    finetune_id: str = Field(min_length=1, max_length=200, description="Name of the finetune to delete.")


class DeleteFinetuneResponse(BaseModel):
    status: str
    message: str
    deleted_finetune_id: str
    timestamp: str = Field(description="When it was deleted (ISO 8601, UTC).")
