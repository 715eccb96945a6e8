"""FLUX.2, fill and expand routes in process (no workers: jobs stay queued until a test ends them):
validation in both dialects with the field named, each dialect's defaults, output sizes (matching the
first input image, the 4 MP cap), eight references, megapixel pricing held at submit and settled at the
end, and the webhook of a task sent with ``webhook_secret`` (a real HTTP receiver on loopback)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from standardwebhooks import Webhook

from fluxserve.api.deps import Services
from fluxserve.app import create_app
from fluxserve.core.job import JobRecord, JobStatus
from fluxserve.core.params import GenerationParams
from fluxserve.jobs.store import Claims
from fluxserve.settings import Settings
from tests.conftest import http_server, png_base64

FLUX2_VENDOR = ["flux-2-pro", "flux-2-max", "flux-2-flex", "flux-2-pro-preview"]
KLEIN = ["flux-2-klein-4b", "flux-2-klein-9b", "flux-2-klein-9b-preview"]
RESELLER = ["flux-2-pro", "flux-2-max", "flux-2-flex"]
SIDE_RULE = "must be 0 (follow the first input image) or a multiple of 16 of at least 64"


class Received:
    """Webhook bodies and headers that reached the loopback receiver."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, dict[str, str]]] = []
        self.arrived = threading.Event()


RECEIVED = Received()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        RECEIVED.items.append((body, {name.lower(): value for name, value in self.headers.items()}))
        RECEIVED.arrived.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


AppClient = tuple[TestClient, Services, Claims]


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppClient]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("flux2"), workers=0, allowed_private_networks="127.0.0.0/8"
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client, app.state.services, app.state.runtime.stores.claims


class Client:
    def __init__(
        self, client: TestClient, services: Services, claims: Claims, credits: str | None = "1000"
    ) -> None:
        self.client, self.services, self.claims = client, services, claims
        record = services.keys.create(
            f"flux2-{services.keys.count()}", None if credits is None else Decimal(credits)
        )
        self.key, self.key_id = record.key, record.record.id

    def vendor(self, model: str, body: dict[str, Any]) -> Any:
        return self.client.post(f"/v1/{model}", json=body, headers={"x-key": self.key})

    def reseller(self, model: str, body: dict[str, Any]) -> Any:
        return self.client.post(f"/bfl/v1/{model}", json=body, headers={"TT-API-KEY": self.key})

    def job(self, response: Any) -> JobRecord:
        assert response.status_code == 200, response.text
        answer = response.json()
        job = self.services.jobs.get(answer.get("id") or answer["data"]["jobId"])
        assert job is not None
        return job

    def balance(self) -> Decimal | None:
        key = self.services.keys.get(self.key_id)
        assert key is not None
        return key.credits

    def params(self, job: JobRecord) -> GenerationParams:
        return GenerationParams.model_validate(job.params)


@pytest.fixture
def api(app_client: AppClient) -> Client:
    return Client(*app_client)


def vendor_errors(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {item["loc"][-1]: item["msg"] for item in response.json()["detail"]}


@pytest.mark.parametrize("model", ["flux-2-pro", "flux-2-flex", "flux-2-klein-4b"])
@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"width": 1000, "height": 1024}, "width", SIDE_RULE),
        ({"width": 1024, "height": 48}, "height", SIDE_RULE),
        ({"width": True, "height": 1024}, "width", SIDE_RULE),
        ({"safety_tolerance": 6}, "safety_tolerance", "must be an integer between 0 and 5"),
        ({"safety_tolerance": -1}, "safety_tolerance", "must be an integer between 0 and 5"),
        ({"output_format": "gif"}, "output_format", "must be 'jpeg' or 'png'"),
        ({"input_image": "%%%"}, "input_image", "not valid base64"),
        ({"webhook_url": "ftp://x"}, "webhook_url", "http(s) URL"),
        ({"webhook_secret": ""}, "webhook_secret", "must be 1 to 256 visible ASCII characters"),
        ({"webhook_secret": "sécret"}, "webhook_secret", "must be 1 to 256 visible ASCII characters"),
        ({"seed": -1}, "seed", "must be an integer between 0 and"),
    ],
)
def test_vendor_flux2_ranges_name_the_field(
    api: Client, model: str, body: dict[str, Any], field: str, rule: str
) -> None:
    errors = vendor_errors(api.vendor(model, {"prompt": "a fox", **body}))
    assert rule in errors[field], errors


def test_every_flux2_vendor_route_has_the_flux2_ranges(api: Client) -> None:
    for model in FLUX2_VENDOR + KLEIN:
        errors = vendor_errors(api.vendor(model, {"prompt": "x", "width": 1000, "safety_tolerance": 6}))
        assert set(errors) == {"width", "safety_tolerance"}, (model, errors)


def test_vendor_flux2_needs_a_prompt_and_caps_4_megapixels(api: Client) -> None:
    assert vendor_errors(api.vendor("flux-2-pro", {}))["prompt"] == "prompt: is required"
    errors = vendor_errors(api.vendor("flux-2-pro", {"prompt": "x", "width": 2064, "height": 2048}))
    assert "at most 4194304 pixels (4 MP)" in errors["width"]
    assert (
        api.job(api.vendor("flux-2-pro", {"prompt": "x", "width": 2048, "height": 2048})).size == "2048x2048"
    )


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"steps": 0}, "steps", "must be an integer between 1 and 50"),
        ({"steps": 51}, "steps", "must be an integer between 1 and 50"),
        ({"guidance": 1.4}, "guidance", "must be a number between 1.5 and 10"),
        ({"guidance": 10.5}, "guidance", "must be a number between 1.5 and 10"),
        ({"prompt_upsampling": "maybe"}, "prompt_upsampling", "must be a boolean"),
    ],
)
def test_vendor_flex_ranges(api: Client, body: dict[str, Any], field: str, rule: str) -> None:
    assert rule in vendor_errors(api.vendor("flux-2-flex", {"prompt": "x", **body}))[field]


def test_vendor_defaults_and_unknown_fields_ignored(api: Client) -> None:
    pro = api.job(api.vendor("flux-2-pro", {"prompt": "x", "aspect_ratio": "16:9", "steps": 3}))
    params = api.params(pro)
    assert (pro.output_format, params.safety_tolerance, params.steps, params.aspect_ratio) == (
        "jpeg",
        2,
        None,
        None,
    )
    assert pro.size == "1024x1024" and not params.prompt_upsampling
    flex = api.params(api.job(api.vendor("flux-2-flex", {"prompt": "x"})))
    assert (flex.steps, flex.guidance, flex.prompt_upsampling) == (50, 5.0, True)
    flex = api.params(api.job(api.vendor("flux-2-flex", {"prompt": "x", "steps": "12", "guidance": "7.5"})))
    assert (flex.steps, flex.guidance) == (12, 7.5)


def test_sizes_follow_the_first_input_image_within_4_megapixels(api: Client) -> None:
    small = {"prompt": "x", "input_image": png_base64((640, 480)), "input_image_2": png_base64((100, 900))}
    assert api.job(api.vendor("flux-2-pro", small)).size == "640x480"
    assert api.job(api.vendor("flux-2-pro", {**small, "width": 0, "height": 0})).size == "640x480"
    assert api.job(api.vendor("flux-2-pro", {**small, "width": 512, "height": 768})).size == "512x768"
    odd = api.job(api.vendor("flux-2-klein-4b", {"prompt": "x", "input_image": png_base64((1001, 333))}))
    assert odd.size == "992x320"  # sides down to multiples of 16
    big = api.job(api.vendor("flux-2-max", {"prompt": "x", "input_image": png_base64((4000, 3000))}))
    assert big.width is not None and big.height is not None
    assert big.width * big.height <= 2048 * 2048 and big.width % 16 == big.height % 16 == 0
    assert abs(big.width / big.height - 4 / 3) < 0.02 and big.width * big.height > 0.98 * 2048 * 2048


def test_eight_references_on_pro_and_four_on_klein(api: Client) -> None:
    refs = {
        f"input_image{'' if i == 1 else f'_{i}'}": png_base64((64, 64), (i * 20, 0, 0)) for i in range(1, 9)
    }
    pro = api.params(api.job(api.vendor("flux-2-pro", {"prompt": "x", **refs})))
    assert [image.field for image in pro.input_images] == list(refs)
    klein = api.params(api.job(api.vendor("flux-2-klein-9b", {"prompt": "x", **refs})))
    assert [image.field for image in klein.input_images] == list(refs)[:4]  # the rest ignored, as unknown


def test_megapixel_pricing_is_held_and_settled(api: Client) -> None:
    before = api.balance()
    answer = api.vendor("flux-2-pro", {"prompt": "x", "width": 1024, "height": 1024}).json()
    assert (answer["cost"], answer["input_mp"], answer["output_mp"]) == (3, 0.0, 1.05)
    edit = {"prompt": "x", "input_image": png_base64((1024, 1024)), "width": 1024, "height": 1024}
    answer = api.vendor("flux-2-pro", edit).json()
    assert (answer["cost"], answer["input_mp"], answer["output_mp"]) == (4.5, 1.05, 1.05)
    assert api.vendor("flux-2-max", {"prompt": "x", "width": 2048, "height": 2048}).json()["cost"] == 16
    assert api.vendor("flux-2-klein-4b", {"prompt": "x", "width": 1920, "height": 1072}).json()["cost"] == 1.5
    assert api.vendor("flux-2-klein-9b", {**edit}).json()["cost"] == 1.7
    assert api.vendor("flux-2-flex", {**edit}).json()["cost"] == 10
    assert (
        before is not None
        and api.balance()
        == before - Decimal("3") - Decimal("4.5") - 16 - Decimal("1.5") - Decimal("1.7") - 10
    )
    # Flat-priced routes keep their answer shape.
    assert set(api.vendor("flux-dev", {"prompt": "x"}).json()) == {"id", "polling_url", "cost"}


def finish(api: Client, job_id: str, status: JobStatus) -> None:
    store = api.claims
    while (claimed := store.claim("test-worker")) is not None and claimed.id != job_id:
        store.finish(claimed.id, "test-worker", JobStatus.FAILED, error="cleared by the test")
    assert claimed is not None, "the job was not queued"
    result = "results/test.png" if status is JobStatus.SUCCEEDED else None
    assert store.finish(job_id, "test-worker", status, result_key=result, error=None)


def test_settlement_keeps_a_success_and_refunds_a_failure(api: Client) -> None:
    start = api.balance()
    assert start is not None
    kept = api.job(api.vendor("flux-2-max", {"prompt": "x", "width": 1440, "height": 1440}))  # 2.07 MP
    refunded = api.job(api.vendor("flux-2-max", {"prompt": "x", "width": 1440, "height": 1440}))
    assert kept.cost == refunded.cost == Decimal("10") and api.balance() == start - 20
    finish(api, kept.id, JobStatus.SUCCEEDED)
    finish(api, refunded.id, JobStatus.FAILED)
    assert api.balance() == start - 10


def test_not_enough_credits_states_the_megapixel_price(app_client: AppClient) -> None:
    poor = Client(*app_client, credits="3.4")
    assert poor.vendor("flux-2-pro", {"prompt": "x", "width": 1024, "height": 1024}).status_code == 200
    response = poor.vendor("flux-2-pro", {"prompt": "x", "width": 1024, "height": 1024})
    assert response.status_code == 402
    detail = response.json()["detail"]
    assert detail == "Insufficient credits: flux-2-pro costs 3 credits and this key has 0.4"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"width": 1000}, "width: must be a multiple of 32 between 256 and 1440"),
        ({"safety_tolerance": "7"}, "safety_tolerance: must be an integer between 0 and 6"),
        ({"input_image": "%%%"}, "input_image: not valid base64"),
        ({"steps": "0"}, "steps: must be an integer between 1 and 50"),
    ],
)
def test_reseller_flux2_validation(api: Client, body: dict[str, Any], message: str) -> None:
    response = api.reseller("flux-2-flex", {"prompt": "x", **body})
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]


@pytest.mark.parametrize("model", RESELLER)
def test_reseller_flux2_routes_defaults_strings_and_image_prompt(api: Client, model: str) -> None:
    job = api.job(
        api.reseller(
            model,
            {
                "prompt": "x",
                "seed": "7",
                "safety_tolerance": "6",
                "input_image": png_base64((320, 240)),
                "image_prompt": png_base64((64, 64)),
            },
        )
    )
    params = api.params(job)
    assert (job.seed, params.safety_tolerance, job.size, job.output_format) == (7, 6, "1024x768", "png")
    assert [image.field for image in params.input_images] == ["input_image", "input_image_2"]
    assert params.image_prompt is None  # FLUX.2 takes it as one more reference
    fetched = api.client.get("/flux/fetch", params={"jobId": job.id}, headers={"TT-API-KEY": api.key}).json()
    assert fetched["data"]["quota"] == str(job.cost.normalize())
    if model == "flux-2-flex":
        assert (params.steps, params.guidance) == (50, 5.0)


def test_reseller_has_no_klein_fill_or_expand_route(api: Client) -> None:
    for model in [*KLEIN, "flux-pro-1.0-fill", "flux-pro-1.0-expand"]:
        assert api.reseller(model, {"prompt": "x"}).status_code == 404


def test_fill_and_expand_validation_defaults_and_sizes(api: Client) -> None:
    image = png_base64((320, 256))
    fill = api.job(
        api.vendor("flux-pro-1.0-fill", {"image": image, "mask": png_base64((320, 256), (255, 255, 255))})
    )
    params = api.params(fill)
    assert (fill.size, fill.cost, params.steps, params.guidance, fill.output_format) == (
        "320x256",
        Decimal(5),
        50,
        60.0,
        "jpeg",
    )
    assert [named.field for named in params.input_images] == ["image", "mask"]
    errors = vendor_errors(api.vendor("flux-pro-1.0-fill", {"image": image, "mask": png_base64((64, 64))}))
    assert errors["mask"].startswith("mask: must be the size of image (320x256)")
    assert vendor_errors(api.vendor("flux-pro-1.0-fill", {"prompt": "x"}))["image"] == "image: is required"
    no_mask = vendor_errors(api.vendor("flux-pro-1.0-fill", {"image": image}))["mask"]
    assert no_mask.startswith("mask: is required")
    for body, field, rule in [
        ({"steps": 14}, "steps", "between 15 and 50"),
        ({"guidance": 101}, "guidance", "between 1.5 and 100"),
        ({"top": 2049}, "top", "between 0 and 2048"),
        ({"left": -1}, "left", "between 0 and 2048"),
    ]:
        assert rule in vendor_errors(api.vendor("flux-pro-1.0-expand", {"image": image, **body}))[field]
    none = vendor_errors(api.vendor("flux-pro-1.0-expand", {"image": image}))
    assert "at least one of top, bottom, left and right" in none["top"]
    grown = api.job(api.vendor("flux-pro-1.0-expand", {"image": image, "top": 16, "left": 64, "right": 8}))
    assert grown.size == "392x272" and grown.cost == 5


def test_webhook_secret_signs_the_tasks_delivery(api: Client) -> None:
    RECEIVED.items.clear()
    RECEIVED.arrived.clear()
    with http_server(Receiver) as origin:
        secret = "my-secret-42"
        job = api.job(
            api.vendor(
                "flux-2-klein-4b", {"prompt": "x", "webhook_url": f"{origin}/hook", "webhook_secret": secret}
            )
        )
        finish(api, job.id, JobStatus.SUCCEEDED)
        deadline = time.monotonic() + 20
        while not RECEIVED.items and time.monotonic() < deadline:
            RECEIVED.arrived.wait(0.2)
    assert RECEIVED.items, "no webhook arrived"
    body, headers = RECEIVED.items[0]
    assert json.loads(body)["id"] == job.id and json.loads(body)["status"] == "Ready"
    assert headers["x-webhook-secret"] == secret
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-bfl-signature"] == f"sha256={expected}"
    key = api.services.keys.get(api.key_id)
    assert key is not None
    Webhook(key.webhook_secret).verify(body, headers)  # the key's own signature is still there


def test_a_url_input_is_held_at_the_bound_then_priced_exactly_once_fetched(api: Client) -> None:
    picture = io.BytesIO()
    Image.new("RGB", (1024, 1024), (5, 80, 160)).save(picture, format="PNG")

    class Picture(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(picture.getvalue())))
            self.end_headers()
            self.wfile.write(picture.getvalue())

        def log_message(self, *_: Any) -> None:
            pass

    start = api.balance()
    assert start is not None
    with http_server(Picture) as origin:
        answer = api.vendor("flux-2-pro", {"prompt": "x", "input_image": f"{origin}/p.png"}).json()
        # Unknown sizes count at 4 MP each: 4.19 out + 4.19 in, eight megapixels.
        assert (answer["cost"], answer["input_mp"], answer["output_mp"]) == (13.5, 4.19, 4.19)
        deadline = time.monotonic() + 20
        while (job := api.services.jobs.get(answer["id"])) is not None and job.status is JobStatus.FETCHING:
            assert time.monotonic() < deadline, "the fetch stage did not take the job"
            time.sleep(0.05)
    assert job is not None and job.status is JobStatus.QUEUED, job
    assert (job.size, job.cost, job.input_mp, job.output_mp) == (
        "1024x1024",
        Decimal("4.5"),
        Decimal("1.05"),
        Decimal("1.05"),
    )
    assert api.balance() == start - Decimal("4.5")
