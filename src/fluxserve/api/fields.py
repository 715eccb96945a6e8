"""Request fields shared by both dialects: their types, ranges and the rule each error message states.

Numbers and booleans sent as strings are accepted (the reseller's own examples send ``"steps":"40"``);
a boolean where a number belongs, a number where text belongs, or a field a route does not have is
refused. Every refusal names the field and the rule from ``RULES``.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUseDefault

from fluxserve.core.sizes import parse_aspect_ratio

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 20_000

RULES: dict[str, str] = {
    "prompt": f"must be a non-empty string of at most {MAX_PROMPT_CHARS} characters",
    "width": "must be a multiple of 32 between 256 and 1440",
    "height": "must be a multiple of 32 between 256 and 1440",
    "steps": "must be an integer between 1 and 50",
    "guidance": "must be a number between 1.5 and 5",
    "interval": "must be a number between 1 and 4",
    "safety_tolerance": "must be an integer between 0 and 6",
    "image_prompt_strength": "must be a number between 0 and 1",
    "output_format": "must be 'jpeg' or 'png'",
    "aspect_ratio": "must be 'W:H' (e.g. '16:9') between 21:9 and 9:21",
    "webhook_url": "must be an http(s) URL of 1 to 2083 characters",
    "seed": f"must be an integer between 0 and {MAX_SEED}",
    "prompt_upsampling": "must be a boolean (true/false)",
    "raw": "must be a boolean (true/false)",
    "input_image": "must be a base64-encoded image or an http(s) URL",
    "input_image_2": "must be a base64-encoded image or an http(s) URL",
    "input_image_3": "must be a base64-encoded image or an http(s) URL",
    "input_image_4": "must be a base64-encoded image or an http(s) URL",
    "image_prompt": "must be a base64-encoded image or an http(s) URL",
}


def _null_is_default(value: Any) -> Any:
    """Clients send ``null`` for "not given"; treat it so rather than as a type error."""
    if value is None:
        raise PydanticUseDefault()
    return value


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("empty prompt")
    return value


def _aspect_ratio(value: str) -> str:
    parse_aspect_ratio(value)
    return value.replace(" ", "")


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    return value


Optional = BeforeValidator(_null_is_default)
Number = BeforeValidator(_not_bool)

Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_non_empty)]
Dimension = Annotated[int, Optional, Number, Field(ge=256, le=1440, multiple_of=32)]
Steps = Annotated[int, Optional, Number, Field(ge=1, le=50)]
Guidance = Annotated[float, Optional, Number, Field(ge=1.5, le=5)]
Interval = Annotated[float, Optional, Number, Field(ge=1, le=4)]
SafetyTolerance = Annotated[int, Optional, Number, Field(ge=0, le=6)]
Strength = Annotated[float, Optional, Number, Field(ge=0, le=1)]
Seed = Annotated[int, Number, Field(ge=0, le=MAX_SEED)] | None
Flag = Annotated[bool, Optional]
AspectRatio = Annotated[str, Optional, AfterValidator(_aspect_ratio)]
WebhookUrl = Annotated[str, Field(min_length=1, max_length=2083), AfterValidator(_http_url)] | None
ImageInput = Annotated[str, Field(min_length=1)] | None


class StrictRequest(BaseModel):
    """Base of every submit schema: unknown fields are refused, numbers must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_strip_whitespace=False)


def error_messages(error: ValidationError | list[dict[str, Any]], model: str) -> list[str]:
    """One ``field: rule`` line per invalid field, in the order the client sent them."""
    errors = error.errors() if isinstance(error, ValidationError) else error
    messages: list[str] = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body",)]
        field = loc[0] if loc else "body"
        if err.get("type") == "extra_forbidden":
            text = f"{field}: unknown field for {model}"
        elif err.get("type") == "missing":
            text = f"{field}: is required"
        elif field in RULES:
            text = f"{field}: {RULES[field]}"
        elif field == "body":
            text = "body: must be a JSON object"
        else:
            text = f"{field}: {err.get('msg', 'is invalid')}"
        if text not in messages:
            messages.append(text)
    return messages
