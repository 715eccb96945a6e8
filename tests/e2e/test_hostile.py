"""Hostile input: oversized bodies and images, decompression bombs, junk. Clear errors, never a 500."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Api, ServerProcess


@pytest.fixture(scope="module")
def small_limits(tmp_path_factory: pytest.TempPathFactory, models_dir) -> ServerProcess:  # type: ignore[no-untyped-def]
    server = ServerProcess(
        tmp_path_factory.mktemp("hostile"), models_dir, {"FLUXSERVE_MAX_INPUT_BYTES": "200000"}
    )
    server.start("--no-workers")
    yield server
    server.stop()


def test_body_over_the_limit_is_413(small_limits: ServerProcess) -> None:
    client = Api(small_limits.base_url, small_limits.create_key()["key"])
    response = client.submit("flux-kontext-pro", {"prompt": "x", "input_image": "A" * 4_000_000})
    assert response.status_code == 413
    assert response.json()["status"] == "FAILED" and "body" in response.json()["message"]


def test_image_over_the_byte_limit_is_400(small_limits: ServerProcess) -> None:
    client = Api(small_limits.base_url, small_limits.create_key()["key"])
    noisy = Image.effect_noise((400, 400), 100).convert("RGB")
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 200_000
    response = client.submit(
        "flux-kontext-pro", {"prompt": "x", "input_image": base64.b64encode(buffer.getvalue()).decode()}
    )
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith("input_image: ")


def test_decompression_bomb_is_refused(api: Api) -> None:
    """A tiny PNG that claims 20000x20000 pixels is refused from its header, before decoding."""
    bomb = Image.new("1", (20000, 20000))
    buffer = io.BytesIO()
    bomb.save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < 200_000
    response = api.submit(
        "flux-kontext-pro", {"prompt": "x", "input_image": base64.b64encode(buffer.getvalue()).decode()}
    )
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith("input_image: ")


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff" * 100,
        b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}",
        b'{"prompt": ' * 3000,
        b'{"prompt": "x", "width": NaN}',
        b'{"prompt": "x", "guidance": Infinity}',
    ],
)
def test_junk_bodies_get_a_400_not_a_500(api: Api, content: bytes) -> None:
    response = api.http.post(
        "/bfl/v1/flux-dev", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["status"] == "FAILED"


def test_odd_but_valid_images_are_accepted(api: Api) -> None:
    for mode in ("RGBA", "P", "L", "CMYK"):
        image = Image.new(mode, (64, 64))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
        value = base64.b64encode(buffer.getvalue()).decode()
        response = api.submit("flux-kontext-pro", {"prompt": "x", "input_image": value})
        assert response.status_code == 200, (mode, response.text)


def test_non_json_content_type(api: Api) -> None:
    response = api.http.post("/bfl/v1/flux-dev", content=b"prompt=x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 400
    response = httpx.post(
        f"{api.base_url}/bfl/v1/flux-dev", data={"prompt": "x"}, headers=dict(api.http.headers)
    )
    assert response.status_code == 400


# Each dialect's error shape (api/errors.py): where its message is, and its status code.
_DIALECTS = [
    ("/bfl/v1/flux-dev", "TT-API-KEY", 400, lambda body: body["message"]),
    ("/flux/generate", "TT-API-KEY", 400, lambda body: body["message"]),
    ("/flux/fetch", "TT-API-KEY", 400, lambda body: body["message"]),
    ("/v1/flux-dev", "x-key", 422, lambda body: body["detail"][0]["msg"]),
    ("/v1/images/generations", "Authorization", 400, lambda body: body["error"]["message"]),
]


@pytest.mark.parametrize(("path", "header", "status", "message"), _DIALECTS)
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": x}', "body is not valid JSON: Expecting value at line 1 column 12"),
        (
            '{\n  "prompt": "a red circle",\n}',
            "body is not valid JSON: Expecting property name enclosed in double quotes at line 3 column 1",
        ),
        ('{"prompt": "a"', "body is not valid JSON: Expecting ',' delimiter at line 1 column 15"),
    ],
)
def test_malformed_json_says_what_and_where_in_each_dialects_shape(
    api: Api, path: str, header: str, status: int, message: Any, content: str, expected: str
) -> None:
    key = f"Bearer {api.key}" if header == "Authorization" else api.key
    response = httpx.post(
        f"{api.base_url}{path}", content=content, headers={header: key, "Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert message(response.json()) == expected
