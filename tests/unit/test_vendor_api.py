"""The vendor dialect in process (no workers, so jobs stay queued): schemas and their defaults,
422/403/402/429 shapes, credits, every result status, and jobs shared with the reseller dialect."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from fluxserve.api.deps import Services
from fluxserve.api.vendor import UNLIMITED_CREDITS
from fluxserve.app import create_app
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.settings import Settings
from fluxserve.surfaces.vendor import render_result
from tests.conftest import png_base64


class Vendor:
    """A TestClient with one key, and the app's services to look at the jobs behind the API."""

    def __init__(self, client: TestClient, services: Services, credits: str | None = "100") -> None:
        self.client = client
        self.services = services
        record = services.keys.create(
            f"k{services.keys.count()}", None if credits is None else Decimal(credits)
        )
        self.key = record.key
        self.headers = {"x-key": self.key}

    def submit(self, model: str, body: Any) -> Any:
        return self.client.post(f"/v1/{model}", json=body, headers=self.headers)

    def job(self, model: str, body: dict[str, Any]) -> JobRecord:
        response = self.submit(model, body)
        assert response.status_code == 200, response.text
        job = self.services.jobs.get(response.json()["id"])
        assert job is not None
        return job

    def result(self, job_id: str) -> dict[str, Any]:
        response = self.client.get("/v1/get_result", params={"id": job_id}, headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Services]]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("vendor"), workers=0, max_active_jobs=3)
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.services


@pytest.fixture
def vendor(app_client: tuple[TestClient, Services]) -> Vendor:
    return Vendor(*app_client)


def test_submit_answers_id_absolute_polling_url_and_cost(vendor: Vendor) -> None:
    response = vendor.submit("flux-dev", {"prompt": "a cat"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "polling_url", "cost"}
    assert body["polling_url"] == f"{vendor.services.base_url}/v1/get_result?id={body['id']}"
    assert body["cost"] == 2.5
    assert vendor.submit("flux-kontext-max", {"prompt": "x"}).json()["cost"] == 8
    path = body["polling_url"].removeprefix(vendor.services.base_url)
    polled = vendor.client.get(path, headers=vendor.headers).json()
    # queued jobs created before it: an added field in the vendor's free-form details
    assert polled.pop("details") == {"queue_position": vendor.services.jobs.queue_position(body["id"])}
    assert polled == {"id": body["id"], "status": "Pending", "result": None, "progress": 0.0, "preview": None}


VENDOR_DEFAULTS = [
    ("flux-dev", {"steps": 28, "guidance": 3.0, "width": 1024, "height": 768, "output_format": "jpeg"}),
    ("flux-pro", {"steps": 40, "guidance": 2.5, "interval": 2.0, "output_format": "jpeg"}),
    ("flux-pro-1.1", {"width": 1024, "height": 768, "output_format": "jpeg", "steps": None}),
    ("flux-pro-1.1-ultra", {"aspect_ratio": "16:9", "output_format": "jpeg", "image_prompt_strength": 0.1}),
    ("flux-kontext-pro", {"aspect_ratio": None, "output_format": "png", "safety_tolerance": 2}),
]


@pytest.mark.parametrize(("model", "expected"), VENDOR_DEFAULTS)
def test_each_model_gets_the_vendors_defaults(vendor: Vendor, model: str, expected: dict[str, Any]) -> None:
    job = vendor.job(model, {"prompt": "defaults"})
    assert {name: job.params[name] for name in expected} == expected
    assert job.params["prompt_upsampling"] is False


def test_reseller_keeps_its_own_defaults_for_the_same_model(vendor: Vendor) -> None:
    response = vendor.client.post(
        "/bfl/v1/flux-dev", json={"prompt": "x"}, headers={"TT-API-KEY": vendor.key}
    )
    job = vendor.services.jobs.get(response.json()["data"]["jobId"])
    assert job is not None
    assert (job.params["steps"], job.params["guidance"], job.params["output_format"]) == (40, 2.5, "png")


def test_fields_are_forwarded_and_kontext_tolerance_is_capped_with_an_image(vendor: Vendor) -> None:
    job = vendor.job(
        "flux-kontext-max",
        {
            "prompt": "edit",
            "input_image": png_base64(),
            "safety_tolerance": 6,
            "seed": 5,
            "aspect_ratio": "4:3",
        },
    )
    assert job.params["safety_tolerance"] == 2  # capped: an input image was given
    assert job.seed == 5 and job.params["aspect_ratio"] == "4:3"
    assert job.params["input_images"][0]["field"] == "input_image"
    assert job.params["input_images"][0]["ref"].startswith("blob:")
    without = vendor.job("flux-kontext-max", {"prompt": "create", "safety_tolerance": 6})
    assert without.params["safety_tolerance"] == 6
    ultra = vendor.job(
        "flux-pro-1.1-ultra",
        {"prompt": "u", "raw": True, "aspect_ratio": "9:16", "prompt_upsampling": "true"},
    )
    assert ultra.params["raw"] is True and ultra.params["prompt_upsampling"] is True
    assert (ultra.width, ultra.height) == (1536, 2736)


def test_unknown_fields_are_ignored_as_the_vendor_does(vendor: Vendor) -> None:
    job = vendor.job("flux-dev", {"prompt": "x", "aspect_ratio": "1:1", "input_image": "ignored"})
    assert (job.width, job.height) == (1024, 768)
    assert job.params["input_images"] == []


def test_image_prompt_alone_is_a_valid_prompt_for_text_models(vendor: Vendor) -> None:
    job = vendor.job("flux-pro-1.1", {"image_prompt": png_base64()})
    assert job.prompt == "" and job.params["image_prompt"].startswith("blob:")


INVALID = [
    (
        "flux-dev",
        {"prompt": "x", "width": 300},
        "width",
        "width: must be a multiple of 32 between 256 and 1440",
    ),
    ("flux-dev", {"prompt": "x", "steps": 51}, "steps", "steps: must be an integer between 1 and 50"),
    ("flux-dev", {"prompt": "x", "guidance": 9}, "guidance", "guidance: must be a number between 1.5 and 5"),
    ("flux-pro", {"prompt": "x", "interval": 0}, "interval", "interval: must be a number between 1 and 4"),
    ("flux-dev", {}, "prompt", "prompt: is required"),
    ("flux-dev", {"prompt": "   "}, "prompt", "prompt: is required"),
    ("flux-kontext-pro", {"input_image": png_base64()}, "prompt", "prompt: is required"),
    ("flux-dev", {"prompt": "x", "output_format": "webp"}, "output_format", "webp only on the routes"),
    ("flux-2-klein-9b-preview", {"prompt": "x", "output_format": "gif"}, "output_format", "or 'webp'"),
    ("flux-tools/erase-v1", {"image": png_base64()}, "mask", "mask: is required"),
    (
        "flux-tools/erase-v1",
        {"image": png_base64(), "mask": png_base64(), "dilate_pixels": 26},
        "dilate_pixels",
        "dilate_pixels: must be an integer between 0 and 25",
    ),
    ("flux-dev", {"prompt": "x", "safety_tolerance": 7}, "safety_tolerance", "between 0 and 6"),
    ("flux-dev", {"prompt": "x", "seed": -1}, "seed", "seed: must be an integer"),
    ("flux-pro-1.1-ultra", {"prompt": "x", "aspect_ratio": "5:1"}, "aspect_ratio", "between 21:9 and 9:21"),
    (
        "flux-pro-1.1-ultra",
        {"prompt": "x", "image_prompt_strength": 2},
        "image_prompt_strength",
        "between 0 and 1",
    ),
    (
        "flux-kontext-pro",
        {"prompt": "x", "input_image": "%%%"},
        "input_image",
        "input_image: not valid base64",
    ),
    ("flux-dev", {"prompt": "x", "webhook_url": "ftp://x"}, "webhook_url", "http(s) URL"),
    (
        "flux-dev",
        {"prompt": "x", "webhook_secret": ""},
        "webhook_secret",
        "webhook_secret: must be 1 to 256 visible ASCII characters",
    ),
    ("flux-dev", {"prompt": "x", "steps": True}, "steps", "steps: must be an integer between 1 and 50"),
]


@pytest.mark.parametrize(("model", "body", "field", "message"), INVALID)
def test_invalid_fields_are_422_in_the_vendors_shape(
    vendor: Vendor, model: str, body: dict[str, Any], field: str, message: str
) -> None:
    response = vendor.submit(model, body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    item = next(item for item in detail if item["loc"] == ["body", field])
    assert set(item) <= {"loc", "msg", "type", "input"} and isinstance(item["type"], str)
    assert message in item["msg"]


def test_body_that_is_not_a_json_object_is_422(vendor: Vendor) -> None:
    headers = {**vendor.headers, "content-type": "application/json"}
    for content, message in (
        (
            b"{not json",
            "body is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        (b"[1, 2]", "body: must be a JSON object"),
        (b'"text"', "body: must be a JSON object"),
    ):
        response = vendor.client.post("/v1/flux-dev", content=content, headers=headers)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert len(detail) == 1 and (detail[0]["loc"], detail[0]["msg"]) == (["body"], message)


def test_non_finite_numbers_are_422_not_500(vendor: Vendor) -> None:
    headers = {**vendor.headers, "content-type": "application/json"}
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        content = b'{"prompt": "x", "width": ' + literal + b"}"
        response = vendor.client.post("/v1/flux-dev", content=content, headers=headers)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "width"]


def test_long_inputs_are_not_echoed_back(vendor: Vendor) -> None:
    response = vendor.submit("flux-dev", {"prompt": "x" * 20_001})
    assert response.status_code == 422
    assert "input" not in response.json()["detail"][0]


@pytest.mark.parametrize("case", ["missing", "wrong", "reseller header"])
def test_missing_or_wrong_key_is_403_in_the_vendors_shape(vendor: Vendor, case: str) -> None:
    headers = {
        "missing": {},
        "wrong": {"x-key": "fs_wrong"},
        "reseller header": {"TT-API-KEY": vendor.key},  # does not authenticate in this dialect
    }[case]
    for response in (
        vendor.client.post("/v1/flux-dev", json={"prompt": "x"}, headers=headers),
        vendor.client.get("/v1/get_result", params={"id": "x"}, headers=headers),
        vendor.client.get("/v1/credits", headers=headers),
    ):
        assert response.status_code == 403
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail.startswith("Not authenticated") and "x-key" in detail


def test_auth_comes_before_validation(vendor: Vendor) -> None:
    assert vendor.client.post("/v1/flux-dev", json={"width": 3}).status_code == 403


def test_credits_follow_holds_and_unlimited_keys_say_so(app_client: tuple[TestClient, Services]) -> None:
    finite = Vendor(*app_client, credits="10")
    assert finite.client.get("/v1/credits", headers=finite.headers).json() == {
        "credits": 10,
        "unlimited": False,
    }
    finite.job("flux-dev", {"prompt": "x"})
    assert finite.client.get("/v1/credits", headers=finite.headers).json()["credits"] == 7.5
    unlimited = Vendor(*app_client, credits=None)
    body = unlimited.client.get("/v1/credits", headers=unlimited.headers).json()
    assert body == {"credits": UNLIMITED_CREDITS, "unlimited": True}


def test_not_enough_credits_is_402(app_client: tuple[TestClient, Services]) -> None:
    poor = Vendor(*app_client, credits="3")
    response = poor.submit("flux-kontext-pro", {"prompt": "x"})
    assert response.status_code == 402
    assert response.json() == {
        "detail": "Insufficient credits: flux-kontext-pro costs 4 credits and this key has 3"
    }


def test_too_many_active_jobs_is_429(app_client: tuple[TestClient, Services]) -> None:
    busy = Vendor(*app_client)
    for _ in range(3):  # the app's limit; no workers, so they stay queued
        busy.job("flux-pro-1.1", {"prompt": "x"})
    response = busy.submit("flux-pro-1.1", {"prompt": "x"})
    assert response.status_code == 429 and "Too many active tasks" in response.json()["detail"]


def test_unknown_or_foreign_task_is_task_not_found(app_client: tuple[TestClient, Services]) -> None:
    owner, other = Vendor(*app_client), Vendor(*app_client)
    job = owner.job("flux-dev", {"prompt": "mine"})
    assert owner.result(job.id)["status"] == "Pending"
    assert other.result(job.id) == {
        "id": job.id,
        "status": "Task not found",
        "result": None,
        "progress": None,
        "details": None,
        "preview": None,
    }
    assert owner.result("no-such-task")["status"] == "Task not found"
    missing = owner.client.get("/v1/get_result", headers=owner.headers)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["query", "id"]


def test_jobs_are_shared_between_the_dialects(vendor: Vendor) -> None:
    reseller = {"TT-API-KEY": vendor.key}
    from_vendor = vendor.job("flux-pro", {"prompt": "vendor-made", "seed": 9})
    fetched = vendor.client.get("/flux/fetch", params={"jobId": from_vendor.id}, headers=reseller).json()
    assert fetched["status"] == "PENDING_QUEUE" and fetched["data"]["seed"] == "9"
    assert fetched["data"]["mode"] == "flux-pro" and fetched["data"]["quota"] == "5"
    response = vendor.client.post("/bfl/v1/flux-dev", json={"prompt": "reseller-made"}, headers=reseller)
    job_id = response.json()["data"]["jobId"]
    assert vendor.result(job_id)["status"] == "Pending"


def _job(status: JobStatus, **fields: Any) -> JobRecord:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": "j1",
        "key_id": "k",
        "model": "flux-dev",
        "params": {},
        "seed": 42,
        "output_format": "png",
        "prompt": "final prompt",
        "cost": Decimal("2.5"),
        "status": status,
        "started_at": now - timedelta(seconds=3),
        "finished_at": now,
    }
    return JobRecord(**{**values, **fields})


def test_every_status_renders_in_the_vendors_words(app_client: tuple[TestClient, Services]) -> None:
    _, services = app_client
    running = render_result(_job(JobStatus.RUNNING, progress=0.4), "j1", services)
    assert (running.status, running.progress, running.result) == ("Pending", 0.4, None)
    ready = render_result(_job(JobStatus.SUCCEEDED, result_key="results/j1.png"), "j1", services)
    assert ready.status == "Ready" and ready.result is not None
    assert ready.result["sample"].startswith(f"{services.base_url}/files/results/j1.png?")
    assert (ready.result["prompt"], ready.result["seed"], ready.result["duration"]) == (
        "final prompt",
        42,
        3.0,
    )
    request = render_result(
        _job(JobStatus.REQUEST_MODERATED, error="Request Moderated: prompt flagged"), "j1", services
    )
    assert request.status == "Request Moderated"
    assert request.details == {"Moderation Reasons": ["prompt flagged"]}
    content = render_result(_job(JobStatus.CONTENT_MODERATED, error="Content Moderated"), "j1", services)
    assert content.status == "Content Moderated"
    failed = render_result(_job(JobStatus.FAILED, error="relay: upstream said no"), "j1", services)
    assert failed.status == "Error" and failed.details == {"error": "relay: upstream said no"}
    canceled = render_result(_job(JobStatus.CANCELED, error="Canceled by the client"), "j1", services)
    assert canceled.status == "Error" and canceled.details == {"error": "Canceled by the client"}
    assert render_result(None, "zz", services).status == "Task not found"


def test_openapi_documents_the_vendor_routes(vendor: Vendor) -> None:
    paths = vendor.client.get("/openapi.json").json()["paths"]
    for model in ("flux-kontext-max", "flux-kontext-pro", "flux-pro-1.1-ultra", "flux-pro-1.1", "flux-pro"):
        assert "post" in paths[f"/v1/{model}"]
    assert "get" in paths["/v1/get_result"] and "get" in paths["/v1/credits"]


def test_a_webhook_is_its_jobs_dialect_rendering_from_one_read_of_the_row(
    app_client: tuple[TestClient, Services],
) -> None:
    client, services = app_client
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    vendor = Vendor(client, services)
    hook = {"prompt": "x", "webhook_url": "https://example.com/hook"}
    task = vendor.job("flux-dev", {**hook, "webhook_secret": "task-secret"})
    reseller_id = client.post("/bfl/v1/flux-dev", json=hook, headers={"TT-API-KEY": vendor.key}).json()
    fetched = services.jobs.get(reseller_id["data"]["jobId"])
    assert fetched is not None
    claims, reads = runtime.stores.claims, runtime.stores.reads
    while (running := claims.claim("w")) is not None:  # ours, and any an earlier test left queued
        ours = running.id in (task.id, fetched.id)
        status = JobStatus.SUCCEEDED if ours else JobStatus.CANCELED
        assert claims.finish(running.id, "w", status, result_key=f"results/{running.id}.png")
    mine = threading.get_ident()  # the app's background tasks query the same database meanwhile
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if threading.get_ident() == mine:
            statements.append(statement.split()[0])

    event.listen(runtime.database, "before_cursor_execute", record)
    try:
        sent = runtime.webhook_payload(reads.get(task.id))  # as the dispatcher reads and renders it
        assert statements == ["SELECT"]
        assert sent.task_secret == "task-secret"
        assert sent.body["status"] == "Ready" and sent.body == vendor.result(task.id)
        assert sent.body["result"]["sample"].startswith("http")
        statements.clear()
        sent = runtime.webhook_payload(reads.get(fetched.id))
        assert statements == ["SELECT"]
        assert sent.task_secret is None
        headers = {"TT-API-KEY": vendor.key}
        fetch = client.get("/flux/fetch", params={"jobId": fetched.id}, headers=headers).json()
        assert sent.body["status"] == "SUCCESS" and sent.body == fetch
    finally:
        event.remove(runtime.database, "before_cursor_execute", record)


def test_openapi_describes_erase_webp_previews_and_schnell(app_client: tuple[TestClient, Services]) -> None:
    doc = app_client[0].get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    erase = schemas["FluxToolsEraseV1Inputs"]
    assert "/v1/flux-tools/erase-v1" in doc["paths"] and set(erase["required"]) == {"image", "mask"}
    dilate = erase["properties"]["dilate_pixels"]
    assert (dilate["minimum"], dilate["maximum"], dilate["default"]) == (0, 25, 10)
    assert "prompt" not in erase["properties"]
    klein = schemas["Flux2Klein9bPreviewInputs"]["properties"]["output_format"]
    assert klein["enum"] == ["jpeg", "png", "webp"]
    assert schemas["FluxDevInputs"]["properties"]["output_format"]["enum"] == ["jpeg", "png"]
    assert schemas["FluxDevRequest"]["properties"]["output_format"]["enum"] == ["jpeg", "png", "webp"]
    assert "preview" in schemas["ResultResponse"]["properties"]
    assert "previewUrl" in schemas["JobData"]["properties"]
    assert "flux1-schnell" in schemas["GenerateRequest"]["properties"]["mode"]["enum"]
    assert not {"/bfl/v1/flux-schnell", "/v1/flux-schnell"} & set(doc["paths"])
