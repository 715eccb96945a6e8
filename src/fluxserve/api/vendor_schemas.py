"""The vendor dialect's response shapes (its published OpenAPI); request schemas come from the model
table (``api/requests.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


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
