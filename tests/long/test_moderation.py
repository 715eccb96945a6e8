"""Local moderation on real ``fluxserve serve`` processes (tiny pipelines, the real classifiers in the
worker process): a flagged prompt or input image is refused in each dialect's shape and not charged; a
request's tolerance 6 lets it through unless the operator's floor says otherwise; FLUXSERVE_MODERATION=off
checks nothing. A flagged output (Content Moderated) is covered in process, in tests/unit/test_moderation.py,
where the engine can be made to draw one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Api, ServerProcess
from tests.support.flagged import flagged_png_base64

FLAGGED_PROMPT = "a photo of a fucking idiot"
TINY = {"steps": 2, "width": 256, "height": 256}


def vendor_result(server: ServerProcess, key: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.Client(base_url=server.base_url, headers={"x-key": key}, timeout=30) as http:
        submitted = http.post(f"/v1/{model}", json=body)
        assert submitted.status_code == 200, submitted.text
        api = Api(server.base_url, key)
        api.wait(submitted.json()["id"])  # through the reseller's fetch: the same job
        result: dict[str, Any] = http.get(submitted.json()["polling_url"]).json()
        return result


@pytest.fixture(scope="module")
def key(server: ServerProcess) -> str:
    return str(server.create_key("moderation", "100")["key"])


def credits(server: ServerProcess, key: str) -> float:
    response = httpx.get(f"{server.base_url}/v1/credits", headers={"x-key": key}, timeout=30)
    return float(response.json()["credits"])


def test_a_flagged_prompt_is_request_moderated_on_the_vendor_route(server: ServerProcess, key: str) -> None:
    result = vendor_result(server, key, "flux-dev", {"prompt": FLAGGED_PROMPT, **TINY})
    assert result["status"] == "Request Moderated", result
    (reason,) = result["details"]["Moderation Reasons"]
    assert reason.startswith("prompt: the text check scored") and reason.endswith("(tolerance 2)")


def test_a_flagged_prompt_fails_on_the_reseller_route_naming_the_check_and_costs_nothing(
    server: ServerProcess, key: str
) -> None:
    api = Api(server.base_url, key)
    before = credits(server, key)
    body = api.wait(api.job("flux-dev", {"prompt": FLAGGED_PROMPT, **TINY}))
    assert body["status"] == "FAILED"
    assert body["message"].startswith("Request Moderated: prompt: the text check scored")
    assert body["data"]["quota"] == "0" and body["data"]["imageUrl"] is None
    assert credits(server, key) == before


def test_a_flagged_prompt_is_a_content_policy_violation_on_openai(server: ServerProcess, key: str) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, timeout=120, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="flux-dev", prompt=FLAGGED_PROMPT, n=2, size="256x256")
    assert caught.value.code == "content_policy_violation"
    assert "Request Moderated: prompt: the text check" in caught.value.message


def test_a_flagged_input_image_is_request_moderated_naming_its_field(server: ServerProcess, key: str) -> None:
    body = {"prompt": "make the background blue", "input_image": flagged_png_base64(256), "steps": 2}
    result = vendor_result(server, key, "flux-kontext-pro", body)
    assert result["status"] == "Request Moderated", result
    assert result["details"]["Moderation Reasons"][0].startswith("input_image: the image check scored")


def test_tolerance_six_generates_the_flagged_prompt(server: ServerProcess, key: str) -> None:
    api = Api(server.base_url, key)
    body = api.wait(api.job("flux-dev", {"prompt": FLAGGED_PROMPT, "safety_tolerance": 6, **TINY}))
    assert body["status"] == "SUCCESS", body


def test_the_operators_floor_caps_the_tolerance_and_off_checks_nothing(
    make_server: Callable[..., ServerProcess],
) -> None:
    for setting, expected in (("3", "FAILED"), ("off", "SUCCESS")):
        server = make_server({"FLUXSERVE_MODERATION": setting})
        server.start()
        api = Api(server.base_url, server.create_key("floor", "100")["key"])
        body = api.wait(api.job("flux-dev", {"prompt": FLAGGED_PROMPT, "safety_tolerance": 6, **TINY}))
        assert body["status"] == expected, (setting, body)
        if setting == "3":
            assert body["message"].endswith("(tolerance 3)")
        server.stop()


def test_a_bad_setting_stops_the_server_naming_it(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server({"FLUXSERVE_MODERATION": "7"})
    with pytest.raises(RuntimeError, match="moderation"):
        server.start()
