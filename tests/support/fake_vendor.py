"""A fake of the vendor's API on loopback, following its published contract, for the relay engine's tests.

- ``POST /v1/<model>`` with ``x-key`` -> ``{"id", "polling_url", "cost"}``; 403 for a wrong key, 402 when
  the account's credits do not cover the price, 429 while ``rate_limited`` submits remain, 422 for a
  kontext or FLUX.2 task without a prompt, a fill/expand task without an image, an erase task without
  its image and mask or with ``dilate_pixels`` outside 0..25, and ``webp`` asked of a route that does
  not list it (:data:`WEBP_ROUTES`). FLUX.2 routes are
  priced by the megapixel (:data:`MEGAPIXEL_PRICES`) and also answer ``input_mp`` and ``output_mp``.
- ``GET <polling_url>`` -> ``{"id", "status", "result", "progress", "details"}``. The polling URL is a
  "regional" one (``/regional/v1/get_result``), as the vendor's global endpoint hands out, so a test can
  tell that a client polled the URL it was given. A new task may be ``Task not found`` for its first
  ``not_found_polls`` polls (the regional store lags the submit), then runs for ``pending_polls`` polls
  through ``pending_statuses`` (``Pending``, or e.g. ``Pending``, ``Queued``, ``Processing``; with
  ``progress``), then ends by what its prompt asks for: ``[request-moderated]``, ``[content-moderated]``,
  ``[error]``, ``[lost]`` (``Task not found`` for good), else ``Ready``.
- Output sizes are the vendor's own (:data:`KONTEXT_SIZES`, :data:`ULTRA_SIZES`), written here rather
  than taken from fluxserve, so that relay tests check fluxserve against the vendor and not against
  itself; width/height routes make exactly the size asked.
- ``result.sample`` is a download URL that expires ``result_ttl`` seconds after the task became Ready
  (the vendor's expire after 10 minutes), answering 403 afterwards.

Everything the fake saw (submits with their headers, poll paths, downloads) is recorded for assertions.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

FAKE_KEY = "fake-upstream-key-0123456789"
# The vendor's published prices (credits per image), written here on their own so that relay tests do not
# just echo fluxserve's table back.
PRICES: dict[str, Decimal] = {
    "flux-kontext-max": Decimal("8"),
    "flux-kontext-pro": Decimal("4"),
    "flux-pro-1.1-ultra": Decimal("6"),
    "flux-pro-1.1": Decimal("4"),
    "flux-pro": Decimal("5"),
    "flux-dev": Decimal("2.5"),
    "flux-pro-1.0-fill": Decimal("5"),
    "flux-pro-1.0-expand": Decimal("5"),
    "flux-tools/erase-v1": Decimal("3"),
    "flux-pro-finetuned": Decimal("6"),
    "flux-pro-1.1-ultra-finetuned": Decimal("7"),
}
# The routes whose output_format takes webp besides jpeg and png (the others answer 422 for it).
WEBP_ROUTES = {"flux-2-klein-9b-preview"}
MAX_DILATE = 25  # erase's dilate_pixels: 0..25
# FLUX.2: (first megapixel, each further megapixel), counting output and input images, in whole megapixels
# (nearest, at least one), per the vendor's pricing page; submits answer cost, input_mp and output_mp.
MEGAPIXEL_PRICES: dict[str, tuple[Decimal, Decimal]] = {
    "flux-2-pro": (Decimal("3"), Decimal("1.5")),
    "flux-2-pro-preview": (Decimal("3"), Decimal("1.5")),
    "flux-2-max": (Decimal("7"), Decimal("3")),
    "flux-2-flex": (Decimal("5"), Decimal("5")),
    "flux-2-klein-4b": (Decimal("1.4"), Decimal("0.1")),
    "flux-2-klein-9b": (Decimal("1.5"), Decimal("0.2")),
    "flux-2-klein-9b-preview": (Decimal("1.5"), Decimal("0.2")),
}
FLUX2_MAX_PIXELS = 2048 * 2048
# The vendor's output sizes for the routes that take an aspect ratio, as it publishes them (docs/reseller.md,
# "Sizes for aspect-ratio routes"); the defaults are 1:1 for kontext without an image, 16:9 for ultra.
KONTEXT_SIZES: dict[str, tuple[int, int]] = {
    "21:9": (1568, 672),
    "16:9": (1392, 752),
    "3:2": (1248, 832),
    "4:3": (1184, 880),
    "1:1": (1024, 1024),
    "3:4": (880, 1184),
    "2:3": (832, 1248),
    "9:16": (752, 1392),
    "9:21": (672, 1568),
}
ULTRA_SIZES: dict[str, tuple[int, int]] = {
    "21:9": (3136, 1344),
    "16:9": (2736, 1536),
    "3:2": (2512, 1680),
    "4:3": (2368, 1776),
    "1:1": (2048, 2048),
    "3:4": (1776, 2368),
    "2:3": (1680, 2512),
    "9:16": (1536, 2736),
    "9:21": (1344, 3136),
}
# Kontext with an input image snaps to the nearest of the resolutions FLUX.1 Kontext was trained on
# (published with the model); the aspect-ratio table above is a subset of them.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip


@dataclass
class FakeTask:
    id: str
    model: str
    payload: dict[str, Any]
    outcome: str
    seed: int
    prompt: str
    polls: int = 0
    ready_at: float | None = None
    image: bytes = b""
    image_size: tuple[int, int] = (0, 0)
    not_found_polls: int = 0  # polls still to answer "Task not found" before the task shows up


@dataclass
class Seen:
    """What the fake received, in order."""

    submits: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    polls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    downloads: list[tuple[str, dict[str, str], int]] = field(default_factory=list)


def _color(seed: int) -> tuple[int, int, int]:
    rng = random.Random(seed)
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _nearest(sizes: Iterable[tuple[int, int]], ratio: float) -> tuple[int, int]:
    return min(sizes, key=lambda wh: abs(math.log(wh[0] / wh[1] / ratio)))


def _ratio(aspect_ratio: str) -> float:
    width, height = aspect_ratio.split(":")
    return int(width) / int(height)


def _image_size(value: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(value))) as image:
        return image.size


def _flux2_size(payload: dict[str, Any]) -> tuple[int, int]:
    """Width and height when both are given (non-zero), else the first input image's within 4 MP in steps
    of 16, else 1024x1024."""
    if payload.get("width") and payload.get("height"):
        return int(payload["width"]), int(payload["height"])
    if not payload.get("input_image"):
        return (1024, 1024)
    width, height = _image_size(payload["input_image"])
    scale = min(1.0, math.sqrt(FLUX2_MAX_PIXELS / (width * height)))
    return max(64, int(width * scale) // 16 * 16), max(64, int(height * scale) // 16 * 16)


def megapixel_cost(model: str, payload: dict[str, Any]) -> tuple[Decimal, float, float]:
    """A FLUX.2 submit's (cost, input_mp, output_mp)."""
    first, further = MEGAPIXEL_PRICES[model]
    width, height = _flux2_size(payload)
    output_mp = width * height / 1e6
    inputs = [value for name, value in payload.items() if name.startswith("input_image") and value]
    input_mp = sum(min(w * h, FLUX2_MAX_PIXELS) / 1e6 for w, h in map(_image_size, inputs))
    whole = max(1, math.floor(output_mp + input_mp + 0.5))
    return first + further * (whole - 1), round(input_mp, 2), round(output_mp, 2)


def _size(model: str, payload: dict[str, Any]) -> tuple[int, int]:
    """The size the vendor would make: exact for width/height routes, by aspect ratio otherwise (a ratio
    outside the published table takes its nearest entry's size); FLUX.2 as :func:`_flux2_size`; fill
    keeps its image's size and expand adds its margins."""
    if model in MEGAPIXEL_PRICES:
        return _flux2_size(payload)
    if model in ("flux-pro-1.0-fill", "flux-tools/erase-v1"):
        return _image_size(payload["image"])
    if model == "flux-pro-1.0-expand":
        width, height = _image_size(payload["image"])
        margins = [int(payload.get(side, 0)) for side in ("top", "bottom", "left", "right")]
        return width + margins[2] + margins[3], height + margins[0] + margins[1]
    aspect_ratio = payload.get("aspect_ratio")
    if model == "flux-pro-1.1-ultra":
        aspect_ratio = aspect_ratio or "16:9"
        return ULTRA_SIZES.get(aspect_ratio) or _nearest(ULTRA_SIZES.values(), _ratio(aspect_ratio))
    if model.startswith("flux-kontext"):
        if aspect_ratio:
            return KONTEXT_SIZES.get(aspect_ratio) or _nearest(KONTEXT_RESOLUTIONS, _ratio(aspect_ratio))
        if payload.get("input_image"):
            with Image.open(io.BytesIO(base64.b64decode(payload["input_image"]))) as image:
                return _nearest(KONTEXT_RESOLUTIONS, image.width / image.height)
        return KONTEXT_SIZES["1:1"]
    return (int(payload.get("width", 1024)), int(payload.get("height", 768)))


def _invalid(model: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The vendor's 422 detail item for a payload its route refuses, else None."""
    if model == "flux-tools/erase-v1":
        required = ["image", "mask"]
    elif model.startswith("flux-pro-1.0-"):
        required = ["image"]
    elif model.startswith(("flux-kontext", "flux-2-")):
        required = ["prompt"]
    elif model.endswith("-finetuned"):  # the vendor's own finetunes, by their id
        required = ["finetune_id"]
    else:
        required = []
    for name in required:
        if not payload.get(name):
            return {"loc": ["body", name], "msg": "Field required", "type": "missing"}
    dilate = payload.get("dilate_pixels", 0)
    if not isinstance(dilate, int) or not 0 <= dilate <= MAX_DILATE:
        return {"loc": ["body", "dilate_pixels"], "msg": "Input should be between 0 and 25", "type": "range"}
    formats = ("jpeg", "png", "webp") if model in WEBP_ROUTES else ("jpeg", "png")
    if payload.get("output_format", "jpeg") not in formats:
        return {"loc": ["body", "output_format"], "msg": "Input should be 'jpeg' or 'png'", "type": "enum"}
    return None


def render(seed: int, size: tuple[int, int], output_format: str) -> bytes:
    """A solid image whose colour is a function of the seed: what the fake vendor "generates"."""
    buffer = io.BytesIO()
    image = Image.new("RGB", size, _color(seed))
    image.save(buffer, format={"jpeg": "JPEG", "webp": "WEBP"}.get(output_format, "PNG"))
    return buffer.getvalue()


class FakeVendor:
    """Start with ``with FakeVendor() as vendor:``; ``vendor.base_url`` is its API root.

    Knobs (change them at any time): ``pending_polls``, ``pending_statuses``, ``not_found_polls``,
    ``result_ttl``, ``credits``, ``rate_limited`` (that many submits answer 429, with
    ``Retry-After: retry_after`` unless that is None), ``poll_failures`` (that many polls answer 503).
    """

    def __init__(
        self,
        key: str = FAKE_KEY,
        *,
        pending_polls: int = 2,
        pending_statuses: Sequence[str] = ("Pending",),
        not_found_polls: int = 0,
        result_ttl: float = 600.0,
        credits: float = 1000.0,
        rate_limited: int = 0,
        retry_after: float | None = 0.05,
        poll_failures: int = 0,
    ) -> None:
        self.key = key
        self.pending_polls = pending_polls
        self.pending_statuses = tuple(pending_statuses)
        self.not_found_polls = not_found_polls
        self.result_ttl = result_ttl
        self.credits = Decimal(str(credits))
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self.poll_failures = poll_failures
        self.tasks: dict[str, FakeTask] = {}
        self.seen = Seen()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="fake-vendor", daemon=True
        )

    def __enter__(self) -> FakeVendor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sample_url(self, task_id: str) -> str:
        task = self.tasks[task_id]
        extension = task.payload.get("output_format", "jpeg")
        return f"{self.base_url}/delivery/{task_id}.{extension}?se={task.ready_at}"

    # -- request handling -------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        vendor = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                content_type = (
                    "application/json" if not isinstance(body, bytes) else "application/octet-stream"
                )
                for name, value in {"Content-Type": content_type, **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("x-key") != vendor.key:
                    self._send(403, {"detail": "Not authenticated - Invalid Authentication"})
                    return False
                return True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = urlsplit(self.path).path
                model = path.removeprefix("/v1/")
                try:
                    payload = json.loads(raw or b"{}")
                except ValueError:
                    payload = None
                with vendor._lock:
                    vendor.seen.submits.append((model, payload, dict(self.headers)))
                    if not self._authorized():
                        return
                    if not path.startswith("/v1/") or (model not in PRICES and model not in MEGAPIXEL_PRICES):
                        self._send(404, {"detail": "Not Found"})
                        return
                    if not isinstance(payload, dict):
                        self._send(422, {"detail": [{"loc": ["body"], "msg": "bad json", "type": "json"}]})
                        return
                    problem = _invalid(model, payload)
                    if problem is not None:
                        self._send(422, {"detail": [problem]})
                        return
                    if vendor.rate_limited > 0:
                        vendor.rate_limited -= 1
                        retry_after = vendor.retry_after
                        self._send(
                            429,
                            {"detail": "You have exceeded the number of active tasks"},
                            {} if retry_after is None else {"Retry-After": str(retry_after)},
                        )
                        return
                    megapixels: dict[str, float] = {}
                    if model in MEGAPIXEL_PRICES:
                        price, megapixels["input_mp"], megapixels["output_mp"] = megapixel_cost(
                            model, payload
                        )
                    else:
                        price = PRICES[model]
                    if vendor.credits < price:
                        self._send(402, {"detail": "Insufficient credits"})
                        return
                    vendor.credits -= price
                    prompt = str(payload.get("prompt", ""))
                    outcome = next(
                        (
                            name
                            for name in ("request-moderated", "content-moderated", "error", "lost")
                            if f"[{name}]" in prompt
                        ),
                        "ready",
                    )
                    seed = payload.get("seed")
                    task = FakeTask(
                        id=str(uuid.uuid4()),
                        model=model,
                        payload=payload,
                        outcome=outcome,
                        seed=seed if isinstance(seed, int) else random.randrange(2**32),
                        prompt=f"upsampled: {prompt}" if payload.get("prompt_upsampling") else prompt,
                        not_found_polls=vendor.not_found_polls,
                    )
                    vendor.tasks[task.id] = task
                polling_url = f"{vendor.base_url}/regional/v1/get_result?id={task.id}"
                self._send(
                    200, {"id": task.id, "polling_url": polling_url, "cost": float(price), **megapixels}
                )

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path.startswith("/delivery/"):
                    self._download(parts.path)
                    return
                if parts.path not in ("/regional/v1/get_result", "/v1/get_result"):
                    self._send(404, {"detail": "Not Found"})
                    return
                with vendor._lock:
                    vendor.seen.polls.append((self.path, dict(self.headers)))
                    if not self._authorized():
                        return
                    if vendor.poll_failures > 0:
                        vendor.poll_failures -= 1
                        self._send(503, {"detail": "Service Unavailable"})
                        return
                    task_id = parse_qs(parts.query).get("id", [""])[0]
                    self._send(200, vendor._result(task_id))

            def _download(self, path: str) -> None:
                task_id = path.removeprefix("/delivery/").rsplit(".", 1)[0]
                task = vendor.tasks.get(task_id)
                expired = (
                    task is None or task.ready_at is None or time.time() > task.ready_at + vendor.result_ttl
                )
                status = 403 if expired else 200
                vendor.seen.downloads.append((path, dict(self.headers), status))
                if expired:
                    self._send(403, b"AuthenticationFailed: Signature not valid in the specified time frame")
                    return
                assert task is not None
                self._send(200, task.image)

        return Handler

    def _result(self, task_id: str) -> dict[str, Any]:
        task = self.tasks.get(task_id)
        if task is not None and task.not_found_polls > 0:
            task.not_found_polls -= 1
            task = None
        if task is None or task.outcome == "lost":
            return {
                "id": task_id,
                "status": "Task not found",
                "result": None,
                "progress": None,
                "details": None,
            }
        task.polls += 1
        base = {"id": task.id, "result": None, "progress": None, "details": None}
        if task.polls <= self.pending_polls:
            # The statuses in order, spread evenly over the pending polls.
            index = (task.polls - 1) * len(self.pending_statuses) // self.pending_polls
            status = self.pending_statuses[index]
            return {**base, "status": status, "progress": round(task.polls / (self.pending_polls + 1), 3)}
        if task.outcome == "request-moderated":
            return {
                **base,
                "status": "Request Moderated",
                "details": {"Moderation Reasons": ["Derivative Works"]},
            }
        if task.outcome == "content-moderated":
            return {**base, "status": "Content Moderated", "details": {"Moderation Reasons": ["NSFW"]}}
        if task.outcome == "error":
            return {**base, "status": "Error", "details": {"error": "GPU fell over"}}
        if task.ready_at is None:
            task.ready_at = time.time()
            task.image_size = _size(task.model, task.payload)
            task.image = render(task.seed, task.image_size, task.payload.get("output_format", "jpeg"))
        result = {"sample": self.sample_url(task.id), "prompt": task.prompt, "seed": task.seed}
        return {**base, "status": "Ready", "result": result}
