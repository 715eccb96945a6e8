"""The relay engine against a fake vendor on loopback: every upstream outcome, and what is forwarded."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
from PIL import Image

from fluxserve.core.catalog import ModelEntry
from fluxserve.engines.base import EngineHooks, EngineRequest, NamedImage
from fluxserve.engines.relay.engine import RelayEngine, aspect_ratio_of, upstream_payload
from fluxserve.engines.relay.vendor_api import RetryPolicy, VendorClient, key_allowed
from fluxserve.errors import EngineError, JobCanceled, Moderated, UpstreamError
from tests.conftest import free_port
from tests.support.engine_fixtures import request
from tests.support.fake_vendor import FAKE_KEY, FakeVendor, _color

KEY_ENV = "FLUXSERVE_TEST_UPSTREAM_KEY"
FAST = {"poll_interval": 0.01, "poll_max_interval": 0.05, "retry_wait": 0.01, "rate_limit_wait": 0.05}


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor() as fake:
        yield fake


def engine_for(
    vendor: FakeVendor | str,
    model: str = "flux-dev",
    key: str = FAKE_KEY,
    sleep: Callable[[float], None] | None = None,
    **options: Any,
) -> RelayEngine:
    base_url = vendor if isinstance(vendor, str) else vendor.base_url
    entry = ModelEntry(
        engine="relay", options={"base_url": base_url, "api_key_env": KEY_ENV, **FAST, **options}
    )
    return RelayEngine(entry, model, environ={KEY_ENV: key}, sleep=sleep)


def dev_request(prompt: str = "a red fox", model: str = "flux-dev", **fields: Any) -> EngineRequest:
    values: dict[str, Any] = {
        "prompt": prompt,
        "width": 320,
        "height": 256,
        "seed": 7,
        "steps": 12,
        "guidance": 3.5,
        "safety_tolerance": 4,
        "prompt_upsampling": True,
        "output_format": "png",
    }
    return request(model, **{**values, **fields})


class Recorder:
    """EngineHooks that remember progress and can cancel after a number of progress reports."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.progress: list[float] = []
        self.cancel_after = cancel_after

    def hooks(self) -> EngineHooks:
        return EngineHooks(progress=self.progress.append, canceled=self.canceled)

    def canceled(self) -> bool:
        return self.cancel_after is not None and len(self.progress) >= self.cancel_after


def decode(value: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(value)))


def test_forwards_every_parameter_polls_the_returned_url_and_reports_progress(vendor: FakeVendor) -> None:
    vendor.pending_polls = 4
    recorder = Recorder()
    result = engine_for(vendor).generate(dev_request(), recorder.hooks())

    (model, payload, headers), *_ = vendor.seen.submits
    assert model == "flux-dev"
    assert payload == {
        "prompt": "a red fox",
        "seed": 7,
        "safety_tolerance": 4,
        "output_format": "png",
        "prompt_upsampling": True,
        "width": 320,
        "height": 256,
        "steps": 12,
        "guidance": 3.5,
    }
    assert headers["x-key"] == FAKE_KEY
    # Polled at the regional URL the vendor returned, never a rewritten one, with the key (same host).
    assert len(vendor.seen.polls) == 5
    assert all(path.startswith("/regional/v1/get_result?id=") for path, _ in vendor.seen.polls)
    assert all(poll_headers["x-key"] == FAKE_KEY for _, poll_headers in vendor.seen.polls)
    # Slow Pending: progress rises with the vendor's, then the download.
    assert recorder.progress == sorted(recorder.progress)
    assert 0 < recorder.progress[0] < recorder.progress[3] < 0.95 <= recorder.progress[-1] < 1
    # The image is the vendor's, downloaded without our key (the CDN is not the API).
    assert result.image.size == (320, 256)
    assert result.image.getpixel((0, 0)) == _color(7)
    (_, cdn_headers, status), *_ = vendor.seen.downloads
    assert status == 200 and "x-key" not in {name.lower() for name in cdn_headers}
    # Upstream seed, final (upsampled) prompt, cost and id are recorded.
    task_id = next(iter(vendor.tasks))
    assert result.prompt == "upsampled: a red fox"
    assert result.seed == 7
    assert result.details["upstream_id"] == task_id
    assert result.details["upstream_cost"] == 2.5
    assert result.details["upstream_seed"] == 7
    assert result.details["upstream_prompt"] == "upsampled: a red fox"


def test_kontext_sends_input_images_as_base64_and_lets_the_image_set_the_aspect(vendor: FakeVendor) -> None:
    first = Image.new("RGB", (300, 200), (10, 200, 30))
    second = Image.new("RGB", (64, 64), (1, 2, 3))
    kontext = request(
        "flux-kontext-max",
        prompt="make it night",
        width=1248,
        height=832,
        seed=3,
        safety_tolerance=2,
        images=[first, second],
    )
    result = engine_for(vendor, "flux-kontext-max").generate(kontext, EngineHooks())
    _, payload, _ = vendor.seen.submits[0]
    assert set(payload) == {
        "prompt",
        "seed",
        "safety_tolerance",
        "output_format",
        "prompt_upsampling",
        "input_image",
        "input_image_2",
    }
    assert decode(payload["input_image"]).convert("RGB").tobytes() == first.tobytes()
    assert decode(payload["input_image_2"]).size == (64, 64)
    assert result.image.size == (1248, 832)  # the vendor followed the 3:2 input image


def test_payload_per_model_follows_the_vendor_schemas() -> None:
    ultra = request(
        "flux-pro-1.1-ultra",
        prompt="p",
        width=2736,
        height=1536,
        seed=1,
        raw=True,
        steps=50,
        image_prompt=Image.new("RGB", (8, 8)),
        image_prompt_strength=0.3,
    )
    payload = upstream_payload(ultra)
    assert payload["aspect_ratio"] == "16:9" and payload["raw"] is True
    assert payload["image_prompt_strength"] == 0.3 and decode(payload["image_prompt"]).size == (8, 8)
    assert not {"width", "height", "steps"} & set(payload)
    pro = upstream_payload(dev_request(interval=3.0, model="flux-pro"))
    assert pro["interval"] == 3.0 and pro["steps"] == 12
    pro11 = upstream_payload(dev_request(model="flux-pro-1.1"))
    assert not {"steps", "guidance", "interval"} & set(pro11)
    kontext = request("flux-kontext-pro", prompt="p", width=832, height=1248, seed=1)
    assert upstream_payload(kontext)["aspect_ratio"] == "2:3"


def test_aspect_ratio_and_key_scope_helpers() -> None:
    assert aspect_ratio_of(1024, 1024) == "1:1"
    assert aspect_ratio_of(2096, 896) == "21:9"
    assert aspect_ratio_of(1000, 700) == "10:7"
    assert key_allowed("https://api.eu2.bfl.ai/v1/get_result?id=1", "https://api.bfl.ai")
    assert key_allowed("https://api.bfl.ai/v1/get_result", "https://api.bfl.ai")
    assert not key_allowed("https://evil.example/v1/get_result", "https://api.bfl.ai")
    assert not key_allowed("https://bfl.ai.evil.example/x", "https://api.bfl.ai")
    assert not key_allowed("http://api.eu2.bfl.ai/v1/get_result", "https://api.bfl.ai")
    assert key_allowed("http://127.0.0.1:9/regional", "http://127.0.0.1:9")
    assert not key_allowed("http://10.0.0.1/x", "http://127.0.0.1:9")
    # No sibling trust: a base under a public suffix hands the key to no other host under it.
    assert not key_allowed("https://evil.co.uk/x", "https://x.co.uk")
    assert not key_allowed("https://eu.vendor.example/x", "https://api.vendor.example")
    assert key_allowed("https://api.eu2.bfl.ai/x", "https://x.co.uk")  # the vendor's own domain
    assert not key_allowed("https://evilbfl.ai/x", "https://api.bfl.ai")
    assert key_allowed("https://eu.vendor.example/x", "https://api.vendor.example", ["*.vendor.example"])
    assert not key_allowed("https://vendor.example/x", "https://api.vendor.example", ["*.vendor.example"])
    assert not key_allowed("https://api.vendor.example/x", "https://api.vendor.example", ["*.bfl.ai"])


@pytest.mark.parametrize(
    ("marker", "kind", "reason"), [("request", "request", "Derivative"), ("content", "content", "NSFW")]
)
def test_moderation_upstream_is_moderation_here(
    vendor: FakeVendor, marker: str, kind: str, reason: str
) -> None:
    with pytest.raises(Moderated) as caught:
        engine_for(vendor).generate(dev_request(f"[{marker}-moderated] x"), EngineHooks())
    assert caught.value.kind == kind
    assert reason in str(caught.value)
    assert str(caught.value).startswith(f"{kind.capitalize()} Moderated")


def test_rate_limited_submit_waits_and_retries(vendor: FakeVendor) -> None:
    vendor.rate_limited = 2
    result = engine_for(vendor).generate(dev_request(), EngineHooks())
    assert len(vendor.seen.submits) == 3
    assert result.image.size == (320, 256)


def test_rate_limit_without_retry_after_waits_the_default_doubling(vendor: FakeVendor) -> None:
    vendor.rate_limited, vendor.retry_after = 2, None
    waits: list[float] = []  # the engine's waits, recorded instead of slept
    result = engine_for(vendor, sleep=waits.append, rate_limit_wait=7.0).generate(
        dev_request(), EngineHooks()
    )
    assert len(vendor.seen.submits) == 3
    assert waits[:2] == [7.0, 14.0]  # then the poll intervals
    assert result.image.size == (320, 256)


def test_rate_limit_waits_what_retry_after_says(vendor: FakeVendor) -> None:
    vendor.rate_limited, vendor.retry_after = 1, 2.5
    waits: list[float] = []
    engine_for(vendor, sleep=waits.append, rate_limit_wait=7.0).generate(dev_request(), EngineHooks())
    assert len(vendor.seen.submits) == 2 and waits[0] == 2.5


def test_rate_limit_that_never_ends_fails_at_the_timeout(vendor: FakeVendor) -> None:
    vendor.rate_limited = 1000
    with pytest.raises(EngineError, match="429"):
        engine_for(vendor, timeout=0.3).generate(dev_request(), EngineHooks())


def test_upstream_error_fails_with_the_vendors_detail(vendor: FakeVendor) -> None:
    with pytest.raises(EngineError, match=r"failed: GPU fell over$"):
        engine_for(vendor).generate(dev_request("[error] x"), EngineHooks())


def test_upstream_402_fails_with_a_message_for_the_operator_and_never_shows_the_key(
    vendor: FakeVendor, caplog: pytest.LogCaptureFixture
) -> None:
    vendor.credits = vendor.credits * 0
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EngineError) as caught:
        engine_for(vendor).generate(dev_request(), EngineHooks())
    message = str(caught.value)
    assert "402" in message and "operator" in message and "credits" in message
    assert FAKE_KEY not in message
    assert all(
        FAKE_KEY not in record.getMessage() and FAKE_KEY not in str(record.__dict__)
        for record in caplog.records
    )


def test_wrong_upstream_key_names_the_variable_not_the_key(vendor: FakeVendor) -> None:
    with pytest.raises(EngineError) as caught:
        engine_for(vendor, key="wrong-key-456").generate(dev_request(), EngineHooks())
    assert KEY_ENV in str(caught.value) and "wrong-key-456" not in str(caught.value)


def test_missing_key_and_bad_options_fail_clearly(vendor: FakeVendor) -> None:
    entry = ModelEntry(engine="relay", options={"base_url": vendor.base_url, "api_key_env": KEY_ENV})
    with pytest.raises(EngineError, match=KEY_ENV):
        RelayEngine(entry, "flux-dev", environ={}).generate(dev_request(), EngineHooks())
    with pytest.raises(EngineError, match="base_url"):
        RelayEngine(ModelEntry(engine="relay", options={}), "flux-dev")
    with pytest.raises(EngineError, match="poll_intervall"):
        RelayEngine(
            ModelEntry(engine="relay", options={"base_url": "http://x", "poll_intervall": 1}), "flux-dev"
        )


def test_queued_and_processing_are_waited_out_like_pending(
    vendor: FakeVendor, caplog: pytest.LogCaptureFixture
) -> None:
    vendor.pending_polls, vendor.pending_statuses = 6, ("Pending", "Queued", "Processing")
    recorder = Recorder()
    result = engine_for(vendor).generate(dev_request(), recorder.hooks())
    assert result.image.size == (320, 256)
    assert len(vendor.seen.polls) == 7
    assert len(recorder.progress) == 7 and recorder.progress == sorted(recorder.progress)
    assert not [record for record in caplog.records if "unknown upstream status" in record.getMessage()]


def test_a_brief_task_not_found_right_after_submit_is_polled_through(vendor: FakeVendor) -> None:
    vendor.not_found_polls = 3
    result = engine_for(vendor, not_found_grace=5).generate(dev_request(), EngineHooks())
    assert result.details["upstream_id"] in vendor.tasks
    assert len(vendor.seen.polls) == 3 + 2 + 1 and len(vendor.seen.submits) == 1
    # Without a grace period the same answer ends the job.
    with pytest.raises(EngineError, match="Task not found"):
        engine_for(vendor, not_found_grace=0).generate(dev_request(), EngineHooks())


def test_task_not_found_after_submit_fails_clearly(vendor: FakeVendor) -> None:
    with pytest.raises(EngineError, match="Task not found"):
        engine_for(vendor, not_found_grace=0.1).generate(dev_request("[lost] x"), EngineHooks())
    assert len(vendor.seen.polls) >= 2  # tolerated for the grace period first


def test_result_is_downloaded_at_once_so_the_expiring_url_does_not_matter(vendor: FakeVendor) -> None:
    vendor.result_ttl = 0.2
    result = engine_for(vendor).generate(dev_request(), EngineHooks())
    time.sleep(0.3)
    task_id = next(iter(vendor.tasks))
    assert httpx.get(vendor.sample_url(task_id)).status_code == 403  # the vendor's URL has expired
    assert result.image.getpixel((5, 5)) == _color(7)  # but we hold the image


def test_the_upstream_task_is_checkpointed_and_a_retry_resumes_it(vendor: FakeVendor) -> None:
    """A worker that dies mid-poll is followed by one that polls the same task: the vendor is paid once."""
    vendor.pending_polls = 10_000
    saved: list[dict[str, Any]] = []
    dying = EngineHooks(checkpoint=saved.append, canceled=lambda: bool(vendor.seen.polls))
    with pytest.raises(JobCanceled):  # stands in for the crash: the first attempt stops after one poll
        engine_for(vendor).generate(dev_request(), dying)
    task_id = next(iter(vendor.tasks))
    assert saved == [{"id": task_id, "polling_url": ANY, "cost": 2.5}]
    assert saved[0]["polling_url"].startswith(f"{vendor.base_url}/regional/")

    vendor.pending_polls = 0
    result = engine_for(vendor).generate(dev_request(resume=saved[0]), EngineHooks())
    assert len(vendor.seen.submits) == 1
    assert result.details["upstream_id"] == task_id
    assert result.image.getpixel((5, 5)) == _color(7)


def test_a_checkpoint_without_a_task_submits_afresh(vendor: FakeVendor) -> None:
    result = engine_for(vendor).generate(dev_request(resume={"id": 3}), EngineHooks())
    assert len(vendor.seen.submits) == 1 and result.details["upstream_id"] in vendor.tasks


def test_cancel_stops_polling(vendor: FakeVendor) -> None:
    vendor.pending_polls = 10_000
    recorder = Recorder(cancel_after=3)
    before = set(threading.enumerate())
    with pytest.raises(JobCanceled):
        engine_for(vendor).generate(dev_request(), recorder.hooks())
    # The call has returned and left no thread of its own (the vendor's request handlers aside): nothing
    # is left that could poll, so the count now is final.
    left = [t for t in threading.enumerate() if t not in before and "process_request" not in t.name]
    assert left == [] and len(vendor.seen.polls) == 3


def test_cancel_is_noticed_while_waiting_out_a_rate_limit(vendor: FakeVendor) -> None:
    vendor.rate_limited, vendor.retry_after = 1000, 30
    canceled = threading.Event()
    threading.Timer(0.2, canceled.set).start()
    started = time.monotonic()
    with pytest.raises(JobCanceled):
        engine_for(vendor).generate(dev_request(), EngineHooks(canceled=canceled.is_set))
    assert time.monotonic() - started < 2


def test_network_errors_are_retried_then_fail(vendor: FakeVendor) -> None:
    vendor.poll_failures = 3
    waits: list[float] = []
    assert engine_for(vendor, sleep=waits.append).generate(dev_request(), EngineHooks()).image.size == (
        320,
        256,
    )
    assert waits[:3] == [0.01, 0.02, 0.04]  # retry_wait, doubling
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EngineError, match=r"cannot reach the upstream API.*gave up after 3 tries"):
        engine_for(dead, retries=2).generate(dev_request(), EngineHooks())


def test_the_retry_wait_doubles_up_to_its_cap() -> None:
    policy = RetryPolicy(retries=9, wait=1.0, max_wait=5.0, rate_limit_wait=20.0, max_rate_limit_wait=60.0)
    assert [policy.failure_wait(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert [policy.rate_limit_wait_for(n, None) for n in range(1, 4)] == [20.0, 40.0, 60.0]
    assert policy.rate_limit_wait_for(3, 90.0) == 90.0  # Retry-After is honoured as sent


def vendor_client(
    handler: Callable[[httpx.Request], httpx.Response], waits: list[float], key_hosts: list[str] | None = None
) -> VendorClient:
    return VendorClient(
        "https://api.vendor.example",
        FAKE_KEY,
        key_name=KEY_ENV,
        policy=RetryPolicy(retries=2, wait=0.5),
        sleep=waits.append,
        transport=httpx.MockTransport(handler),
        key_hosts=key_hosts,
    )


def test_a_submit_that_broke_after_it_was_sent_is_not_retried() -> None:
    """The task may exist upstream: a second submit could be paid for twice."""
    sent: list[httpx.Request] = []

    def read_timeout(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        raise httpx.ReadTimeout("no answer", request=request)

    waits: list[float] = []
    with pytest.raises(UpstreamError, match="not retried"), vendor_client(read_timeout, waits) as client:
        client.submit("flux-dev", {"prompt": "p"})
    assert len(sent) == 1 and waits == []


def test_a_submit_that_could_not_connect_or_met_a_gateway_error_is_retried() -> None:
    answers = iter([httpx.ConnectError("refused"), httpx.Response(503), httpx.Response(502)])

    def flaky(request: httpx.Request) -> httpx.Response:
        answer = next(answers, None)
        if isinstance(answer, Exception):
            raise answer
        return answer or httpx.Response(200, json={"id": "t1", "polling_url": "/v1/get_result?id=t1"})

    waits: list[float] = []
    with vendor_client(flaky, waits) as client:
        with pytest.raises(UpstreamError, match=r"HTTP 502\); gave up after 3 tries"):
            client.submit("flux-dev", {"prompt": "p"})
        assert waits == [0.5, 1.0]
        task = client.submit("flux-dev", {"prompt": "p"})
    assert (task.id, task.polling_url, task.cost) == ("t1", "/v1/get_result?id=t1", None)


@pytest.mark.parametrize(
    ("key_hosts", "eu_key"), [(None, None), (["api.vendor.example", "*.vendor.example"], FAKE_KEY)]
)
def test_the_key_goes_to_the_vendors_hosts_only(key_hosts: list[str] | None, eu_key: str | None) -> None:
    """By default only the base host (and bfl.ai's) get the key: a sibling host must be allowed by name."""
    seen: dict[str, str | None] = {}

    def record(request: httpx.Request) -> httpx.Response:
        seen[str(request.url.host)] = request.headers.get("x-key")
        if request.url.path.startswith("/v1/flux"):
            return httpx.Response(200, json={"id": "t", "polling_url": "https://eu.vendor.example/r?id=t"})
        if request.url.host == "eu.vendor.example":
            return httpx.Response(200, json={"id": "t", "status": "Ready"})
        return httpx.Response(200, content=b"image")

    with vendor_client(record, [], key_hosts) as client:
        task = client.submit("flux-dev", {"prompt": "p"})
        assert client.result(task)["status"] == "Ready"
        assert client.download("https://cdn.example/x.jpg", task_id="t", max_bytes=5) == b"image"
        with pytest.raises(UpstreamError, match="over 4 bytes"):
            client.download("https://cdn.example/x.jpg", task_id="t", max_bytes=4)
    assert seen == {"api.vendor.example": FAKE_KEY, "eu.vendor.example": eu_key, "cdn.example": None}


def test_erase_is_forwarded_with_its_image_mask_and_dilation(vendor: FakeVendor) -> None:
    image = Image.new("RGB", (96, 64), (10, 200, 30))
    mask = Image.new("L", (96, 64), 0)
    erase = request(
        "flux-tools/erase-v1",
        prompt="",
        width=96,
        height=64,
        seed=5,
        dilate_pixels=7,
        images=[NamedImage("image", image), NamedImage("mask", mask)],
    )
    result = engine_for(vendor, "flux-tools/erase-v1").generate(erase, EngineHooks())
    model, payload, _ = vendor.seen.submits[0]
    assert model == "flux-tools/erase-v1"
    assert set(payload) == {"image", "mask", "dilate_pixels", "seed", "safety_tolerance", "output_format"}
    assert payload["dilate_pixels"] == 7 and decode(payload["mask"]).size == (96, 64)
    assert result.image.size == (96, 64)


def test_an_erase_the_vendor_refuses_fails_with_its_reason(vendor: FakeVendor) -> None:
    images = [NamedImage("image", Image.new("RGB", (32, 32))), NamedImage("mask", Image.new("L", (32, 32)))]
    erase = request("flux-tools/erase-v1", prompt="", width=32, height=32, dilate_pixels=40, images=images)
    with pytest.raises(EngineError, match="dilate_pixels"):
        engine_for(vendor, "flux-tools/erase-v1").generate(erase, EngineHooks())


def test_webp_is_forwarded_where_the_vendor_lists_it_and_fetched_as_png_elsewhere(vendor: FakeVendor) -> None:
    klein = request("flux-2-klein-9b-preview", prompt="p", width=64, height=64, output_format="webp")
    engine_for(vendor, "flux-2-klein-9b-preview").generate(klein, EngineHooks())
    engine_for(vendor).generate(dev_request(output_format="webp"), EngineHooks())
    (_, preview, _), (_, dev, _) = vendor.seen.submits
    assert preview["output_format"] == "webp"
    assert dev["output_format"] == "png"  # flux-dev's endpoint refuses webp: the server encodes it
    assert vendor.seen.downloads[0][0].endswith(".webp")


def test_a_model_the_vendor_does_not_serve_is_relayed_only_to_an_endpoint_the_operator_names(
    vendor: FakeVendor,
) -> None:
    with pytest.raises(EngineError, match="no endpoint for flux-schnell"):
        engine_for(vendor, "flux-schnell")
    engine = engine_for(vendor, "flux-schnell", upstream_model="flux-dev")
    engine.generate(request("flux-schnell", prompt="p", width=256, height=256), EngineHooks())
    model, payload, _ = vendor.seen.submits[-1]
    assert model == "flux-dev" and payload["prompt"] == "p" and "steps" not in payload
