"""Every validation rule of the spec, against the real server: 400, the reseller body, the field named."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Api, png_base64

GOOD = {"prompt": "a red circle"}

# (model, body, field named in the message, words of the rule)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("flux-dev", {}, "prompt", "is required"),
    ("flux-dev", {"prompt": ""}, "prompt", "non-empty"),
    ("flux-dev", {"prompt": "   "}, "prompt", "non-empty"),
    ("flux-dev", {"prompt": 42}, "prompt", "string"),
    ("flux-dev", {"prompt": "x" * 20_001}, "prompt", "at most"),
    ("flux-dev", {**GOOD, "width": 300}, "width", "multiple of 32 between 256 and 1440"),
    ("flux-dev", {**GOOD, "width": 224}, "width", "multiple of 32"),
    ("flux-dev", {**GOOD, "width": 1472}, "width", "between 256 and 1440"),
    ("flux-dev", {**GOOD, "height": 100}, "height", "multiple of 32 between 256 and 1440"),
    ("flux-dev", {**GOOD, "height": "tall"}, "height", "multiple of 32"),
    ("flux-dev", {**GOOD, "width": 512.5}, "width", "multiple of 32"),
    ("flux-dev", {**GOOD, "width": True}, "width", "multiple of 32"),
    ("flux-dev", {**GOOD, "steps": 0}, "steps", "between 1 and 50"),
    ("flux-dev", {**GOOD, "steps": 51}, "steps", "between 1 and 50"),
    ("flux-dev", {**GOOD, "steps": "many"}, "steps", "integer"),
    ("flux-dev", {**GOOD, "guidance": 1.4}, "guidance", "between 1.5 and 5"),
    ("flux-dev", {**GOOD, "guidance": 5.1}, "guidance", "between 1.5 and 5"),
    ("flux-dev", {**GOOD, "guidance": "nan"}, "guidance", "between 1.5 and 5"),
    ("flux-pro", {**GOOD, "interval": 0.5}, "interval", "between 1 and 4"),
    ("flux-pro", {**GOOD, "interval": 4.5}, "interval", "between 1 and 4"),
    ("flux-dev", {**GOOD, "safety_tolerance": 7}, "safety_tolerance", "between 0 and 6"),
    ("flux-dev", {**GOOD, "safety_tolerance": -1}, "safety_tolerance", "between 0 and 6"),
    (
        "flux-pro-1.1-ultra",
        {**GOOD, "image_prompt_strength": 1.5},
        "image_prompt_strength",
        "between 0 and 1",
    ),
    (
        "flux-pro-1.1-ultra",
        {**GOOD, "image_prompt_strength": -0.1},
        "image_prompt_strength",
        "between 0 and 1",
    ),
    ("flux-dev", {**GOOD, "output_format": "gif"}, "output_format", "'jpeg', 'png' or 'webp'"),
    ("flux-dev", {**GOOD, "output_format": "jpg"}, "output_format", "'jpeg', 'png' or 'webp'"),
    ("flux-kontext-pro", {**GOOD, "aspect_ratio": "22:9"}, "aspect_ratio", "between 21:9 and 9:21"),
    ("flux-kontext-pro", {**GOOD, "aspect_ratio": "9:22"}, "aspect_ratio", "between 21:9 and 9:21"),
    ("flux-kontext-pro", {**GOOD, "aspect_ratio": "wide"}, "aspect_ratio", "W:H"),
    ("flux-kontext-pro", {**GOOD, "aspect_ratio": "0:1"}, "aspect_ratio", "W:H"),
    ("flux-pro-1.1-ultra", {**GOOD, "aspect_ratio": "16/9"}, "aspect_ratio", "W:H"),
    ("flux-dev", {**GOOD, "webhook_url": ""}, "webhook_url", "http(s) URL of 1 to 2083"),
    ("flux-dev", {**GOOD, "webhook_url": "ftp://example.com/x"}, "webhook_url", "http(s) URL"),
    ("flux-dev", {**GOOD, "webhook_url": "not a url"}, "webhook_url", "http(s) URL"),
    ("flux-dev", {**GOOD, "webhook_url": "https://e.com/" + "a" * 2080}, "webhook_url", "2083"),
    ("flux-dev", {**GOOD, "seed": -1}, "seed", "integer between 0"),
    ("flux-dev", {**GOOD, "seed": 2**64}, "seed", "integer between 0"),
    ("flux-dev", {**GOOD, "seed": "lucky"}, "seed", "integer"),
    ("flux-dev", {**GOOD, "prompt_upsampling": "maybe"}, "prompt_upsampling", "boolean"),
    ("flux-pro-1.1-ultra", {**GOOD, "raw": 2}, "raw", "boolean"),
    ("flux-kontext-pro", {**GOOD, "input_image": "bm90IGFuIGltYWdl"}, "input_image", "not a decodable image"),
    ("flux-kontext-pro", {**GOOD, "input_image": "%%%"}, "input_image", "base64"),
    ("flux-kontext-pro", {**GOOD, "input_image_3": "bm90IGFuIGltYWdl"}, "input_image_3", "image"),
    ("flux-dev", {**GOOD, "image_prompt": "bm90IGFuIGltYWdl"}, "image_prompt", "image"),
]


@pytest.mark.parametrize(("model", "body", "field", "rule"), INVALID)
def test_invalid_requests_are_400_naming_the_field(
    api: Api, model: str, body: dict[str, Any], field: str, rule: str
) -> None:
    response = api.submit(model, body)
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["status"] == "FAILED"
    assert payload["data"] is None
    assert payload["message"].startswith(f"{field}: ") or f"; {field}: " in payload["message"]
    assert rule in payload["message"], payload["message"]


def test_all_errors_are_listed_at_once(api: Api) -> None:
    response = api.submit("flux-dev", {"prompt": "x", "width": 100, "steps": 99})
    message = response.json()["message"]
    assert "width: " in message and "steps: " in message


@pytest.mark.parametrize(
    ("model", "body"),
    [
        ("flux-dev", {**GOOD, "interval": 2}),
        ("flux-pro-1.1", {**GOOD, "steps": "not even a number"}),
        ("flux-kontext-max", {**GOOD, "width": 512, "mode": "whatever"}),
        ("flux-dev", {**GOOD, "input_image": "abc", "aspect_ratio": "1:1"}),
    ],
)
def test_fields_a_route_does_not_have_are_ignored(api: Api, model: str, body: dict[str, Any]) -> None:
    """As both upstreams do: clients send supersets (one sends aspect_ratio to every route)."""
    response = api.submit(model, body)
    assert response.status_code == 200, response.text
    job = api.fetch(response.json()["data"]["jobId"])
    assert job["data"]["mode"] == model


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x", "steps": "40", "guidance": "2.5", "width": "512", "height": "256", "seed": "7"},
        {"prompt": "x", "prompt_upsampling": "false", "safety_tolerance": "6"},
        {"prompt": "x", "prompt_upsampling": "true", "output_format": "jpeg"},
        {"prompt": "x", "seed": None, "webhook_url": None, "width": None},
        {"prompt": "x", "width": 1440, "height": 256, "steps": 1, "guidance": 5},
    ],
)
def test_strings_and_nulls_for_numbers_and_booleans_are_accepted(api: Api, body: dict[str, Any]) -> None:
    response = api.submit("flux-dev", body)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "SUCCESS"


def test_body_that_is_not_a_json_object(api: Api) -> None:
    for content in (b"[1, 2]", b"not json", b'"prompt"'):
        response = api.http.post(
            "/bfl/v1/flux-dev", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert response.json()["status"] == "FAILED"


def test_kontext_accepts_data_uri_and_plain_base64(api: Api) -> None:
    image = png_base64()
    for value in (image, f"data:image/png;base64,{image}"):
        response = api.submit("flux-kontext-pro", {"prompt": "make it blue", "input_image": value})
        assert response.status_code == 200, response.text


def test_unknown_route_and_method_use_the_envelope(api: Api) -> None:
    response = api.http.post("/bfl/v1/flux-schnell", json=GOOD)
    assert response.status_code == 404
    assert response.json()["status"] == "FAILED"
    assert httpx.get(f"{api.base_url}/bfl/v1/flux-dev").json()["status"] == "FAILED"
