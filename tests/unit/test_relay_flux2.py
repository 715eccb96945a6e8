"""The relay engine on the FLUX.2, fill and expand routes against the fake vendor (extended per the vendor's
contract): each route's vendor fields are forwarded, eight references under their own names, the sizes
and megapixel costs are the vendor's, and nothing of our own delivery (webhook_url, webhook_secret) goes
upstream."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from fluxserve.core.catalog import ModelEntry
from fluxserve.engines.base import EngineHooks, NamedImage
from fluxserve.engines.relay.engine import RelayEngine
from tests.support.engine_fixtures import request
from tests.support.fake_vendor import FakeVendor

KEY_ENV = "FLUXSERVE_TEST_UPSTREAM_KEY"
FAST = {"poll_interval": 0.01, "poll_max_interval": 0.05, "retry_wait": 0.01}
COLORS = [(i * 30, 255 - i * 30, 7) for i in range(8)]


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor(pending_polls=1) as fake:
        yield fake


def relay(vendor: FakeVendor, model: str) -> RelayEngine:
    entry = ModelEntry(engine="relay", options={"base_url": vendor.base_url, "api_key_env": KEY_ENV, **FAST})
    return RelayEngine(entry, model, environ={KEY_ENV: vendor.key})


def decode(value: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(value)))


def submitted(vendor: FakeVendor) -> dict[str, Any]:
    (_, payload, _), *_ = vendor.seen.submits
    return payload


def test_flux2_pro_forwards_eight_references_its_size_and_no_delivery_fields(vendor: FakeVendor) -> None:
    refs = [Image.new("RGB", (64, 48), color) for color in COLORS]
    job = request(
        "flux-2-pro", prompt="p", width=1024, height=1024, seed=5, safety_tolerance=3, images=refs,
        output_format="jpeg",
    )  # fmt: skip
    result = relay(vendor, "flux-2-pro").generate(job, EngineHooks())
    payload = submitted(vendor)
    names = ["input_image", *(f"input_image_{i}" for i in range(2, 9))]
    assert set(payload) == {"prompt", "seed", "safety_tolerance", "output_format", "width", "height", *names}
    assert [decode(payload[name]).getpixel((0, 0)) for name in names] == COLORS
    assert (payload["width"], payload["height"], payload["safety_tolerance"]) == (1024, 1024, 3)
    assert result.image.size == (1024, 1024)
    # 1.05 MP out + 8 x 0.003 MP in: one megapixel, as the vendor charged it
    assert result.details["upstream_cost"] == 3.0


def test_flex_forwards_steps_guidance_and_upsampling_and_pays_per_megapixel(vendor: FakeVendor) -> None:
    job = request(
        "flux-2-flex", prompt="p", width=1440, height=1440, seed=1, steps=20, guidance=7.5,
        prompt_upsampling=True, images=[Image.new("RGB", (1024, 1024))],
    )  # fmt: skip
    result = relay(vendor, "flux-2-flex").generate(job, EngineHooks())
    payload = submitted(vendor)
    assert (payload["steps"], payload["guidance"], payload["prompt_upsampling"]) == (20, 7.5, True)
    assert result.details["upstream_cost"] == 15.0  # 2.07 + 1.05 MP: three megapixels, 5 + 2 x 5


def test_a_reseller_flux2_job_is_sent_within_the_vendors_safety_range(vendor: FakeVendor) -> None:
    job = request("flux-2-max", prompt="p", width=1024, height=768, seed=1, safety_tolerance=6)
    relay(vendor, "flux-2-max").generate(job, EngineHooks())
    payload = submitted(vendor)
    assert payload["safety_tolerance"] == 5 and "prompt_upsampling" not in payload


def test_klein_without_a_size_follows_its_reference(vendor: FakeVendor) -> None:
    job = request(
        "flux-2-klein-4b", prompt="p", width=640, height=480, seed=1, images=[Image.new("RGB", (640, 480))]
    )
    result = relay(vendor, "flux-2-klein-4b").generate(job, EngineHooks())
    assert result.image.size == (640, 480) and submitted(vendor)["width"] == 640


def test_fill_sends_image_and_mask_and_expand_its_margins(vendor: FakeVendor) -> None:
    image, mask = Image.new("RGB", (320, 256), (9, 9, 9)), Image.new("RGB", (320, 256), (255, 255, 255))
    fill = request(
        "flux-pro-1.0-fill", prompt="", width=320, height=256, seed=2, steps=30, guidance=40.0,
        images=[NamedImage("image", image), NamedImage("mask", mask)],
    )  # fmt: skip
    result = relay(vendor, "flux-pro-1.0-fill").generate(fill, EngineHooks())
    payload = submitted(vendor)
    assert set(payload) == {
        "prompt", "seed", "safety_tolerance", "output_format", "prompt_upsampling", "image", "mask", "steps",
        "guidance",
    }  # fmt: skip
    assert decode(payload["mask"]).size == (320, 256) and (payload["steps"], payload["guidance"]) == (
        30,
        40.0,
    )
    assert result.image.size == (320, 256) and result.details["upstream_cost"] == 5.0
    expand = request(
        "flux-pro-1.0-expand", prompt="", width=352, height=264, seed=2, top=8, left=32,
        images=[NamedImage("image", image)],
    )  # fmt: skip
    result = relay(vendor, "flux-pro-1.0-expand").generate(expand, EngineHooks())
    (_, payload, _) = vendor.seen.submits[1]
    assert (payload["top"], payload["bottom"], payload["left"], payload["right"]) == (8, 0, 32, 0)
    assert not {"width", "height", "mask"} & set(payload)
    assert result.image.size == (352, 264)
