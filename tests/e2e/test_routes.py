"""Every submit route end to end on the real server: the job runs and the image is what was asked."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Api, png_base64

CASES = [
    ("flux-dev", {"width": 512, "height": 256, "steps": 4}, (512, 256), "PNG"),
    ("flux-dev", {"output_format": "jpeg", "steps": "3"}, (1024, 768), "JPEG"),
    ("flux-pro", {"width": 256, "height": 384, "steps": 3, "interval": 3, "guidance": 4}, (256, 384), "PNG"),
    ("flux-pro-1.1", {"width": 640, "height": 480}, (640, 480), "PNG"),
    ("flux-pro-1.1-ultra", {"aspect_ratio": "16:9", "output_format": "jpeg"}, (2736, 1536), "JPEG"),
    ("flux-pro-1.1-ultra", {"raw": "true"}, (2048, 2048), "PNG"),
    ("flux-kontext-pro", {"aspect_ratio": "3:4"}, (880, 1184), "PNG"),
    ("flux-kontext-max", {}, (1024, 1024), "PNG"),
]


@pytest.mark.parametrize(("model", "extra", "size", "image_format"), CASES)
def test_route_makes_the_requested_image(
    api: Api, model: str, extra: dict, size: tuple[int, int], image_format: str
) -> None:
    job_id = api.job(model, {"prompt": "a small red star in the top left corner", "seed": 3, **extra})
    body = api.wait(job_id)
    assert body["status"] == "SUCCESS", body
    assert body["message"] == "success"
    data = body["data"]
    assert data["mode"] == model and data["jobId"] == job_id == body["jobId"]
    assert data["size"] == f"{size[0]}x{size[1]}"
    assert data["seed"] == "3"
    image = api.image(body)
    assert image.format == image_format
    assert image.size == size


def test_kontext_with_input_image_follows_its_aspect(api: Api) -> None:
    job_id = api.job(
        "flux-kontext-pro", {"prompt": "make it blue", "input_image": png_base64((300, 150)), "seed": 1}
    )
    body = api.wait(job_id)
    assert body["status"] == "SUCCESS", body
    assert api.image(body).size == (1456, 720)  # nearest Kontext resolution to 2:1


def test_kontext_input_image_by_url(api: Api) -> None:
    """A URL input is fetched by the worker (loopback is allowed in tests by the operator switch)."""
    first = api.wait(api.job("flux-dev", {"prompt": "source", "width": 256, "height": 256, "steps": 1}))
    job_id = api.job("flux-kontext-pro", {"prompt": "edit", "input_image": first["data"]["imageUrl"]})
    body = api.wait(job_id)
    assert body["status"] == "SUCCESS", body
    assert body["data"]["size"] == "1024x1024"


def test_same_seed_same_bytes_and_different_seed_differs(api: Api) -> None:
    request = {"prompt": "a blue heart", "width": 256, "height": 256, "steps": 2, "seed": 11}
    first = api.wait(api.job("flux-dev", request))
    second = api.wait(api.job("flux-dev", request))
    third = api.wait(api.job("flux-dev", {**request, "seed": 12}))
    get = lambda body: httpx.get(body["data"]["imageUrl"]).content  # noqa: E731
    assert get(first) == get(second)
    assert get(first) != get(third)


def test_random_seed_is_drawn_and_recorded(api: Api) -> None:
    body = api.wait(api.job("flux-dev", {"prompt": "x", "width": 256, "height": 256, "steps": 1}))
    assert body["data"]["seed"].isdigit()
    replay = api.wait(
        api.job(
            "flux-dev",
            {"prompt": "x", "width": 256, "height": 256, "steps": 1, "seed": int(body["data"]["seed"])},
        )
    )
    assert httpx.get(body["data"]["imageUrl"]).content == httpx.get(replay["data"]["imageUrl"]).content


def test_prompt_upsampling_reports_the_final_prompt(api: Api) -> None:
    plain = api.wait(api.job("flux-dev", {"prompt": "a cat", "steps": 1, "seed": 5}))
    upsampled = api.wait(
        api.job("flux-dev", {"prompt": "a cat", "steps": 1, "seed": 5, "prompt_upsampling": True})
    )
    assert plain["data"]["prompt"] == "a cat"
    assert upsampled["data"]["prompt"].startswith("a cat, ")
    assert len(upsampled["data"]["prompt"]) > len("a cat, ")


def test_fetch_by_post_with_either_id_spelling(api: Api) -> None:
    job_id = api.job("flux-dev", {"prompt": "x", "steps": 1, "webhook_url": "http://127.0.0.1:9/hook"})
    for key in ("jobId", "job_id"):
        response = api.http.post("/flux/fetch", json={key: job_id})
        assert response.status_code == 200, response.text
        assert response.json()["jobId"] == job_id
        assert response.json()["data"]["hookUrl"] == "http://127.0.0.1:9/hook"
    assert api.http.get("/flux/fetch", params={"job_id": job_id}).json()["jobId"] == job_id


def test_fetch_unknown_and_missing_job(api: Api) -> None:
    response = api.http.get("/flux/fetch", params={"jobId": "00000000-0000-0000-0000-000000000000"})
    assert response.status_code == 404
    assert response.json() == {"status": "FAILED", "message": response.json()["message"], "data": None}
    assert "jobId" in response.json()["message"]
    assert api.http.get("/flux/fetch").status_code == 400
    assert api.http.post("/flux/fetch", json={}).status_code == 400


def test_quota_is_the_price_as_a_string(api: Api) -> None:
    body = api.wait(api.job("flux-dev", {"prompt": "x", "steps": 1}))
    assert body["data"]["quota"] == "2.5"
    body = api.wait(api.job("flux-pro-1.1", {"prompt": "x", "width": 256, "height": 256}))
    assert body["data"]["quota"] == "4"


def test_healthz_and_openapi(api: Api) -> None:
    assert httpx.get(f"{api.base_url}/healthz").json()["status"] == "ok"
    schema = httpx.get(f"{api.base_url}/openapi.json").json()
    for model in (
        "flux-kontext-max",
        "flux-kontext-pro",
        "flux-pro-1.1-ultra",
        "flux-pro-1.1",
        "flux-pro",
        "flux-dev",
    ):
        assert f"/bfl/v1/{model}" in schema["paths"]
    assert httpx.get(f"{api.base_url}/docs").status_code == 200
