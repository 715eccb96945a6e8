"""Every request field a route can have: its type, its range, and the rule an error message states.

Both dialects take their fields from here (the model table says which route has which, with what default),
so a range is written once. Numbers and booleans sent as strings are accepted (the reseller's own examples
send ``"steps":"40"``); a boolean where a number belongs or a number where text belongs is refused, and
every refusal names the field and the rule from ``RULES``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError, PydanticUseDefault

from fluxserve.core.sizes import parse_aspect_ratio

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 20_000
IMAGE_RULE = "must be a base64-encoded image or an http(s) URL"
MAX_EXPAND = 2048  # pixels an expand route may add on one side
MAX_WEBHOOK_SECRET = 256
MAX_DILATE = 25  # the vendor's erase tool grows its mask by at most this many pixels
MAX_FINETUNE_STRENGTH = 2  # the vendor's range for finetune_strength: 0 (no effect) to 2
MAX_FINETUNE_ID = 200

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
    "dilate_pixels": f"must be an integer between 0 and {MAX_DILATE}",
    "aspect_ratio": "must be 'W:H' (e.g. '16:9') between 21:9 and 9:21",
    "webhook_url": "must be an http(s) URL of 1 to 2083 characters",
    "seed": f"must be an integer between 0 and {MAX_SEED}",
    "prompt_upsampling": "must be a boolean (true/false)",
    "raw": "must be a boolean (true/false)",
    "input_image": IMAGE_RULE,
    "input_image_2": IMAGE_RULE,
    "input_image_3": IMAGE_RULE,
    "input_image_4": IMAGE_RULE,
    "input_image_5": IMAGE_RULE,
    "input_image_6": IMAGE_RULE,
    "input_image_7": IMAGE_RULE,
    "input_image_8": IMAGE_RULE,
    "image_prompt": IMAGE_RULE,
    "image": IMAGE_RULE,
    "mask": f"{IMAGE_RULE}, the size of image (white: repaint, black: keep)",
    "top": f"must be an integer between 0 and {MAX_EXPAND}",
    "bottom": f"must be an integer between 0 and {MAX_EXPAND}",
    "left": f"must be an integer between 0 and {MAX_EXPAND}",
    "right": f"must be an integer between 0 and {MAX_EXPAND}",
    "webhook_secret": f"must be 1 to {MAX_WEBHOOK_SECRET} visible ASCII characters (it travels in a header)",
    "finetune_id": "must be the name of a finetune this key may use (GET /v1/my_finetunes lists them)",
    "finetune_strength": f"must be a number between 0 and {MAX_FINETUNE_STRENGTH}",
}

# The vendor offers webp on some routes only (VARIANT_TYPES["webp_format"]): say so instead of "invalid".
VENDOR_RULES: dict[str, str] = {
    **RULES,
    "output_format": "must be 'jpeg' or 'png' (webp only on the routes that list it)",
    "prompt": f"must be a string of at most {MAX_PROMPT_CHARS} characters, non-empty unless "
    "image_prompt is given",
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


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("blank prompt")
    return value


def _aspect_ratio(value: str) -> str:
    parse_aspect_ratio(value)
    return value.replace(" ", "")


def _http_url(value: str) -> str:
    """An http(s) URL that can be fetched as written, else ValueError saying why.

    Refused: whitespace, control characters or backslashes anywhere; several ``@``; an IPv6 zone; a port
    outside 1..65535; a numeric host other than a dotted quad (``0177.0.0.1``, ``2130706433``,
    ``0x7f.1``: parsers disagree on them); a percent-encoded, empty or malformed host name. The same rules
    as ``safety.fetch.url_problem``, which checks again before each fetch.
    """
    value = value.strip()
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 or char == "\\" for char in value):
        raise ValueError("contains whitespace, control characters or a backslash")
    parts = urlsplit(value)  # ValueError for a broken IPv6 literal such as http://[::1
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    if parts.netloc.count("@") > 1:
        raise ValueError("more than one '@' before the host")
    if parts.port == 0:  # .port raises ValueError for a non-number or one above 65535
        raise ValueError("port 0")
    host = parts.hostname
    if ":" in host:
        if "%" in host:
            raise ValueError("IPv6 zone identifiers are not allowed")
        ipaddress.IPv6Address(host)
        return value
    if "%" in host:
        raise ValueError("percent-encoded host")
    labels = host.rstrip(".").split(".")
    if re.fullmatch(r"0[xX][0-9a-fA-F]*|[0-9]+", labels[-1]):
        ipaddress.IPv4Address(host)  # only the dotted quad of four decimal numbers
        return value
    name = host if host.isascii() else host.encode("idna").decode("ascii")
    label = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
    if len(name) > 253 or not all(label.fullmatch(part) for part in name.lower().rstrip(".").split(".")):
        raise ValueError("not a valid host name")
    return value


def _ruled(rule: str) -> WrapValidator:
    """Any refusal of the wrapped type becomes one ``field_rule`` error stating ``rule``: for a field
    whose range on some routes differs from :data:`RULES` (see :data:`VARIANT_TYPES`)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # null is "not given" here too: raised inside the handler, PydanticUseDefault would be a
        # SchemaError (a 500) instead of the field's default.
        _null_is_default(value)
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("field_rule", rule) from None

    return WrapValidator(check)


def _zero_or_at_least_64(value: int) -> int:
    if 0 < value < MIN_FLUX2_SIDE:
        raise ValueError(f"below {MIN_FLUX2_SIDE}")
    return value


Optional = BeforeValidator(_null_is_default)
# One rule for choice fields (a mode or model name, a size, a response format) in every dialect: read with
# surrounding whitespace trimmed, as a hand-typed form field often carries a space.
Trimmed = BeforeValidator(lambda value: value.strip() if isinstance(value, str) else value)
Number = BeforeValidator(_not_bool)

# A constraint written before the validators is part of the JSON Schema (minimum, maximum, multipleOf,
# minLength); one written after a BeforeValidator would come out as pydantic's own ge/le/multiple_of.
# Not blank: a validator, not a JSON Schema pattern (``\S`` within 20000 characters takes schema-driven
# generators seconds per example).
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_non_blank)]
OptionalPrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), Optional]
Dimension = Annotated[int, Field(ge=256, le=1440, multiple_of=32), Optional, Number]
Steps = Annotated[int, Field(ge=1, le=50), Optional, Number]
Guidance = Annotated[float, Field(ge=1.5, le=5), Optional, Number]
Interval = Annotated[float, Field(ge=1, le=4), Optional, Number]
MAX_SAFETY = 6  # the most lenient safety_tolerance (FLUX.2's scale stops at MAX_FLUX2_SAFETY)
SafetyTolerance = Annotated[int, Field(ge=0, le=MAX_SAFETY), Optional, Number]
Strength = Annotated[float, Field(ge=0, le=1), Optional, Number]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), Number] | None
Flag = Annotated[bool, Optional]
AspectRatio = Annotated[str, Optional, AfterValidator(_aspect_ratio)]
OptionalAspectRatio = AspectRatio | None
OutputFormat = Annotated[Literal["jpeg", "png"], Optional]
Dilate = Annotated[int, Field(ge=0, le=MAX_DILATE), Optional, Number]
WebhookUrl = (
    Annotated[
        str,
        Field(min_length=1, max_length=2083, json_schema_extra={"format": "uri"}),
        AfterValidator(_http_url),
    ]
    | None
)
WebhookSecret = Annotated[str, Field(min_length=1, max_length=MAX_WEBHOOK_SECRET, pattern=r"^[!-~]+$")] | None
Margin = Annotated[int, Field(ge=0, le=MAX_EXPAND), Optional, Number]
ImageInput = Annotated[str, Field(min_length=1)] | None
FinetuneId = Annotated[str, Field(min_length=1, max_length=MAX_FINETUNE_ID), AfterValidator(_non_blank)]
FinetuneStrength = Annotated[float, Field(ge=0, le=MAX_FINETUNE_STRENGTH), Optional, Number]

MAX_REFERENCES = 8
REFERENCE_FIELDS = tuple(
    "input_image" if index == 0 else f"input_image_{index + 1}" for index in range(MAX_REFERENCES)
)
# Every image field, in the order a job keeps them: the references, then fill/expand's image and mask.
IMAGE_FIELDS = (*REFERENCE_FIELDS, "image", "mask")


def input_image_field(index: int) -> str:
    """``0`` -> ``input_image``, ``2`` -> ``input_image_3``: how both dialects name reference images."""
    return "input_image" if index == 0 else f"input_image_{index + 1}"


# Each field's type and its description in the OpenAPI document. The aspect ratio is optional (None) on
# kontext, which follows its input image, and has a default elsewhere: see OPTIONAL_TYPES.
FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "prompt": (Prompt, "Text prompt for image generation."),
    "seed": (Seed, "Optional seed for reproducibility; random when absent."),
    "output_format": (OutputFormat, "Output format: 'jpeg' or 'png'."),
    "prompt_upsampling": (Flag, "Rewrite the prompt for more creative output."),
    "safety_tolerance": (SafetyTolerance, "0 (most strict) to 6 (least strict)."),
    "webhook_url": (WebhookUrl, "Receives the job's result when it ends."),
    "webhook_secret": (
        WebhookSecret,
        "The webhook for this task carries it (X-Webhook-Secret) and an "
        "HMAC-SHA256 of its body made with it (X-BFL-Signature: sha256=<hex>).",
    ),
    "input_image": (ImageInput, "Base64 image or URL to edit."),
    **{name: (ImageInput, "Further reference image (base64 or URL).") for name in REFERENCE_FIELDS[1:]},
    "image": (ImageInput, "Base64 image or URL to fill or expand."),
    "mask": (ImageInput, "Mask the size of image: white is repainted, black kept (default: image's alpha)."),
    "top": (Margin, f"Pixels to add above the image, 0..{MAX_EXPAND}."),
    "bottom": (Margin, f"Pixels to add below the image, 0..{MAX_EXPAND}."),
    "left": (Margin, f"Pixels to add left of the image, 0..{MAX_EXPAND}."),
    "right": (Margin, f"Pixels to add right of the image, 0..{MAX_EXPAND}."),
    "dilate_pixels": (Dilate, f"Pixels to grow the mask by before erasing (covers edges), 0..{MAX_DILATE}."),
    "aspect_ratio": (AspectRatio, "Between 21:9 and 9:21."),
    "image_prompt": (ImageInput, "Optional image to remix (base64 or URL)."),
    "image_prompt_strength": (Strength, "Blend of prompt (0) and image (1)."),
    "raw": (Flag, "Less processed, more natural-looking images."),
    "width": (Dimension, "Multiple of 32 in 256..1440."),
    "height": (Dimension, "Multiple of 32 in 256..1440."),
    "steps": (Steps, "Denoising steps, 1..50."),
    "guidance": (Guidance, "Guidance scale, 1.5..5."),
    "interval": (Interval, "Guidance interval, 1..4."),
    "finetune_id": (
        FinetuneId,
        "The finetune (LoRA adapter) to apply: its name, as GET /v1/my_finetunes lists.",
    ),
    "finetune_strength": (
        FinetuneStrength,
        f"The finetune's weight: 0 (no effect) to {MAX_FINETUNE_STRENGTH}; 1 applies it as trained.",
    ),
}
MIN_FLUX2_SIDE = 64
MAX_FLUX2_SAFETY = 5


@dataclass(frozen=True)
class Variant:
    """A model-table default for a field whose type and range on that route are not the common ones
    (:data:`FIELD_TYPES`) but ``VARIANT_TYPES[kind]``; its errors state that variant's rule."""

    kind: str
    default: Any


def _variant(annotation: Any, rule: str, description: str) -> tuple[Any, str, str]:
    return Annotated[annotation, _ruled(rule)], rule, description


# kind -> (type, the rule an error states, description). FLUX.2 on the vendor's dialect: sizes in steps of
# 16 from 64 (0 or absent: the first input image's), at most MAX_FLUX2_PIXELS (checked with both sides
# in core.sizes), safety 0..5; flex's guidance 1.5..10; the fill and expand tools' steps and guidance.
VARIANT_TYPES: dict[str, tuple[Any, str, str]] = {
    "flux2_side": _variant(
        Annotated[int, Field(ge=0, multiple_of=16), Optional, Number, AfterValidator(_zero_or_at_least_64)]
        | None,
        f"must be 0 (follow the first input image) or a multiple of 16 of at least {MIN_FLUX2_SIDE}, "
        "with width x height at most 4 megapixels",
        "Multiple of 16, at least 64; 0 or absent: the first input image's (at most 4 MP in all).",
    ),
    "flux2_safety": _variant(
        Annotated[int, Field(ge=0, le=MAX_FLUX2_SAFETY), Optional, Number],
        f"must be an integer between 0 and {MAX_FLUX2_SAFETY}",
        "0 (most strict) to 5 (least strict).",
    ),
    "flex_guidance": _variant(
        Annotated[float, Field(ge=1.5, le=10), Optional, Number],
        "must be a number between 1.5 and 10",
        "Guidance scale, 1.5..10.",
    ),
    "tool_steps": _variant(
        Annotated[int, Field(ge=15, le=50), Optional, Number],
        "must be an integer between 15 and 50",
        "Denoising steps, 15..50.",
    ),
    "webp_format": _variant(
        Annotated[Literal["jpeg", "png", "webp"], Optional],
        "must be 'jpeg', 'png' or 'webp'",
        "Output format: 'jpeg', 'png' or 'webp'.",
    ),
    "tool_guidance": _variant(
        Annotated[float, Field(ge=1.5, le=100), Optional, Number],
        "must be a number between 1.5 and 100",
        "Guidance scale, 1.5..100.",
    ),
}
# The type a field takes where the model table gives it no default (None: not given).
OPTIONAL_TYPES: dict[str, Any] = {"aspect_ratio": OptionalAspectRatio, "prompt": OptionalPrompt}


MAX_ERROR_MESSAGES = 20


def error_messages(
    error: ValidationError | list[dict[str, Any]], limit: int = MAX_ERROR_MESSAGES
) -> list[str]:
    """One ``field: rule`` line per invalid field, in the order the client sent them.

    Linear in the number of errors, and at most ``limit`` distinct lines followed by ``... and N more``
    (N distinct lines left out), so a body with thousands of errors gets a short answer.
    """
    errors = error.errors() if isinstance(error, ValidationError) else error
    seen: set[str] = set()
    messages: list[str] = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body",)]
        field = loc[0] if loc else "body"
        if err.get("type") == "missing":
            text = f"{field}: is required"
        elif err.get("type") == "field_rule":
            text = f"{field}: {err.get('msg')}"
        elif err.get("type") == "json_invalid":  # api.errors.readable_errors says what and where
            text = str(err.get("msg"))
        elif field in RULES:
            text = f"{field}: {RULES[field]}"
        elif field == "body":
            text = "body: must be a JSON object"
        else:
            text = f"{field}: {err.get('msg', 'is invalid')}"
        if text not in seen:
            seen.add(text)
            if len(messages) < limit:
                messages.append(text)
    if len(seen) > len(messages):
        messages.append(f"... and {len(seen) - len(messages)} more")
    return messages
