"""The OpenAI images dialect, driven by the official ``openai`` package pointed at a real fluxserve on
loopback: generations and edits come back with real images, each image an ordinary job; errors arrive as
the SDK's own exceptions with their param and code."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import Api, ServerProcess, png_base64

WAIT_SECONDS = 1.0


def _client(server: ServerProcess, key: str, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, timeout=120, **options)  # type: ignore[arg-type]


def _png(size: tuple[int, int] = (64, 48)) -> bytes:
    return base64.b64decode(png_base64(size))


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> openai.OpenAI:
    """The shared server (with a worker) and a key with credits."""
    return _client(server, server.create_key("openai", "1000")["key"], max_retries=0)


@pytest.fixture(scope="module")
def api_only(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerProcess]:
    """No workers, so that no job ever ends, and a 1 s wait: for the timeout and the refusals."""
    process = ServerProcess(
        tmp_path_factory.mktemp("openai"), models_dir, {"FLUXSERVE_OPENAI_WAIT_SECONDS": str(WAIT_SECONDS)}
    )
    process.start("--no-workers")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def api_only_key(api_only: ServerProcess) -> str:
    return str(api_only.create_key("refusals", "100")["key"])


def test_generations_return_n_images_as_base64_each_an_ordinary_job(
    sdk: openai.OpenAI, server: ServerProcess
) -> None:
    raw = sdk.images.with_raw_response.generate(
        model="flux-pro-1.1", prompt="a red circle", n=2, size="256x256", response_format="b64_json",
        quality="hd", style="vivid", extra_body={"seed_me": True},
    )  # fmt: skip
    result = raw.parse()
    assert len(result.data) == 2 and result.created > 0
    for item in result.data:
        assert item.b64_json is not None and item.revised_prompt == "a red circle"
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (256, 256)
    job_ids = raw.headers["x-job-ids"].split(",")
    fetched = [Api(server.base_url, sdk.api_key).fetch(job_id) for job_id in job_ids]
    assert [body["status"] for body in fetched] == ["SUCCESS", "SUCCESS"]
    assert {body["data"]["mode"] for body in fetched} == {"flux-pro-1.1"}


def test_generations_url_points_at_the_signed_result(sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(model="flux-kontext-pro", prompt="a blue square", size="1024x768")
    assert result.data and result.data[0].url is not None
    response = httpx.get(result.data[0].url, timeout=30)
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (1184, 880)  # Kontext's size for 4:3


def test_edits_take_several_images_and_a_mask(sdk: openai.OpenAI) -> None:
    result = sdk.images.edit(
        model="flux-kontext-pro",
        image=[("a.png", _png(), "image/png"), ("b.png", _png((32, 32)), "image/png")],
        mask=("mask.png", _png(), "image/png"),
        prompt="make it blue",
        response_format="b64_json",
    )
    assert len(result.data) == 1 and result.data[0].b64_json is not None
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (1184, 880)


def test_a_wrong_key_is_401_invalid_api_key(api_only: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        _client(api_only, "not-a-key", max_retries=0).images.generate(prompt="x")
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"size": "big"}, "size"),
        ({"size": "2100x100"}, "size"),  # 21:1 is beyond 21:9
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"response_format": "gif"}, "response_format"),
        ({"prompt": "   "}, "prompt"),
    ],
)
def test_invalid_parameters_are_400_naming_the_param(
    api_only: ServerProcess, api_only_key: str, options: dict[str, object], param: str
) -> None:
    client = _client(api_only, api_only_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(**{"prompt": "a cat", **options})  # type: ignore[arg-type]
    assert raised.value.param == param
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["message"].startswith(f"{param}: ")
    assert raised.value.body["type"] == "invalid_request_error"


def test_an_unknown_model_is_404_model_not_found(api_only: ServerProcess, api_only_key: str) -> None:
    client = _client(api_only, api_only_key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.images.generate(model="dall-e-3", prompt="a cat")
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


def test_not_enough_credits_is_402_and_nothing_is_left_queued(api_only: ServerProcess) -> None:
    key = api_only.create_key("poor", "3")["key"]  # one flux-dev (2.5), not two
    with pytest.raises(openai.APIStatusError) as raised:
        _client(api_only, key, max_retries=0).images.generate(model="flux-dev", prompt="a cat", n=2)
    assert raised.value.status_code == 402 and raised.value.code == "insufficient_quota"
    balance = httpx.get(f"{api_only.base_url}/v1/credits", headers={"x-key": key}, timeout=10).json()
    assert balance["credits"] == 3  # the first job was canceled, its hold released


def test_a_timeout_is_504_once_and_the_job_carries_on(api_only: ServerProcess, api_only_key: str) -> None:
    client = _client(api_only, api_only_key)  # the SDK's default retries: the 504 says not to
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as raised:
        client.images.generate(model="flux-dev", prompt="a slow cat")
    assert time.monotonic() - started < 3 * WAIT_SECONDS  # one attempt
    assert raised.value.status_code == 504 and raised.value.code == "timeout"
    job_id = raised.value.message.rsplit("(ids: ", 1)[1].rstrip(")")
    assert Api(api_only.base_url, api_only_key).fetch(job_id)["status"] == "PENDING_QUEUE"


def test_edit_refusals_name_the_image(api_only: ServerProcess, api_only_key: str) -> None:
    client = _client(api_only, api_only_key, max_retries=0)
    for images, words in (
        ([("a.png", b"not an image", "image/png")], "image: not a decodable image"),
        ([("a.png", _png(), "image/png")] * 5, "image: flux-kontext-pro takes at most 4 image(s)"),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            client.images.edit(model="flux-kontext-pro", image=images, prompt="make it blue")
        assert raised.value.param == "image"
        assert isinstance(raised.value.body, dict) and raised.value.body["message"].startswith(words)
