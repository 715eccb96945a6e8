"""The web playground in a real browser (Debian's chromium driven by Playwright) against a real server on
loopback with the bundled model: fill the form, submit, watch the progress bar move, get the image, find
it in the gallery; a bad key and a bad field read as errors. Screenshots go to tests/artifacts/. The same
server shows the note on prompt words the bundled model does not know, in both dialects.

The routes themselves (redirect, files, the gallery's list) are also checked in-process, without a browser.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from fluxserve.app import create_app
from fluxserve.settings import Settings
from tests.conftest import Api, ServerProcess
from tests.e2e import test_extras_e2e

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).parents[1] / "artifacts"
preview_server = test_extras_e2e.preview_server  # previews after every step, on the tiny pipeline
needs_browser = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not os.environ.get("FLUXSERVE_REQUIRE_BROWSER"),
    reason="no chromium (apt-get install chromium); FLUXSERVE_REQUIRE_BROWSER=1 makes this a failure",
)
# Every value the page gives its progress bar, recorded as it changes (the bar reflects to its attribute).
RECORD_PROGRESS = """
window.progressSeen = [];
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.querySelector("#progress");
  new MutationObserver(() => window.progressSeen.push(bar.value))
    .observe(bar, { attributes: true, attributeFilter: ["value"] });
});
"""


def test_the_playground_routes_in_process(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path, workers=0))) as client:
        assert client.get("/", follow_redirects=False).headers["location"] == "/playground/"
        page = client.get("/playground/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert client.get("/playground/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/playground/__init__.py").status_code == 404  # only the page's files
        refused = client.get("/playground/jobs", headers={"TT-API-KEY": "fs_wrong"})
        assert refused.status_code == 401 and refused.json()["message"] == "TT-API-KEY is not a valid API key"


@pytest.fixture(scope="module")
def shipped(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[tuple[ServerProcess, str]]:
    """A server on the shipped catalog (the bundled model), and a key with credits."""
    server = ServerProcess(tmp_path_factory.mktemp("playground"), models_dir, {"FLUXSERVE_CATALOG": ""})
    server.start()
    yield server, server.create_key("player", credits="100")["key"]
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


def _open(browser: Browser, base_url: str) -> Page:
    page = browser.new_page()
    page.add_init_script(RECORD_PROGRESS)
    page.goto(f"{base_url}/")  # redirected to /playground/
    page.wait_for_selector("body[data-ready=true]")
    return page


@needs_browser
def test_fill_submit_watch_progress_get_the_image_and_find_it_in_the_gallery(
    shipped: tuple[ServerProcess, str], browser: Browser
) -> None:
    server, key = shipped
    page = _open(browser, server.base_url)
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")
    page.select_option("#model", "flux-dev")
    # the form comes from the model's schema, limits shown
    assert "256..1440" in page.inner_text("#field-width-help")
    page.fill("#field-prompt", "a large red circle in the center on a light blue background")
    page.fill("#field-steps", "28")  # long enough that the stream shows a step between
    page.fill("#field-width", "256")
    page.fill("#field-height", "256")
    page.fill("#field-seed", "7")
    page.press("#field-seed", "Enter")  # the keyboard submits the form

    page.wait_for_selector("#result:not([hidden])", timeout=90_000)
    page.screenshot(path=ARTIFACTS / "playground-result.png", full_page=True)
    seen = page.evaluate("window.progressSeen")
    assert any(0 < value < 1 for value in seen) and seen[-1] == 1, seen
    meta = page.inner_text("#result-meta")
    assert "seed\n7" in meta and "size\n256x256" in meta and "light blue background" in meta
    assert page.evaluate("document.querySelector('#result-image').naturalWidth") > 0
    src = page.get_attribute("#result-image", "src")
    assert src is not None
    image = Image.open(io.BytesIO(httpx.get(src, timeout=30).content))
    image.load()
    assert image.size == (256, 256)

    job_id = page.get_attribute("#job", "data-job-id")
    item = page.wait_for_selector(f'#gallery li[data-job-id="{job_id}"] img')
    gallery_src = item.get_attribute("src") if item is not None else None
    assert gallery_src is not None  # the same file; its URL signed anew (a second later, another expires)
    assert gallery_src.partition("?")[0] == src.partition("?")[0]

    # re-run from the gallery: the same model, prompt and seed, a new job
    page.click(f'#gallery li[data-job-id="{job_id}"] button')
    # a selector, not wait_for_function: the page's CSP allows no eval, which a string predicate needs
    page.wait_for_selector(f'#job:not([data-job-id="{job_id}"])')
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    assert "seed\n7" in page.inner_text("#result-meta")
    page.close()


@needs_browser
def test_a_reference_image_given_to_the_form_is_sent_as_base64(
    shipped: tuple[ServerProcess, str], browser: Browser, tmp_path: Path
) -> None:
    server, key = shipped
    reference = tmp_path / "reference.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(reference)
    page = _open(browser, server.base_url)
    page.fill("#api-key", key)
    page.select_option("#model", "flux-kontext-pro")
    page.fill("#field-prompt", "make the background white")
    page.set_input_files("#field-input_image", reference)
    assert page.is_visible("#field-input_image ~ img")  # a preview
    with page.expect_request(lambda request: request.url.endswith("/bfl/v1/flux-kontext-pro")) as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["prompt"] == "make the background white"
    assert Image.open(io.BytesIO(base64.b64decode(body["input_image"]))).size == (64, 48)
    assert sent.value.response().status == 200  # accepted
    page.close()


@needs_browser
def test_a_bad_field_and_a_bad_key_read_as_errors(
    shipped: tuple[ServerProcess, str], browser: Browser
) -> None:
    server, key = shipped
    page = _open(browser, server.base_url)
    page.fill("#api-key", key)
    page.select_option("#model", "flux-dev")
    page.fill("#field-prompt", "a small star")
    page.fill("#field-width", "100")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == "width: must be a multiple of 32 between 256 and 1440"
    assert page.get_attribute("#field-width", "aria-invalid") == "true"
    page.screenshot(path=ARTIFACTS / "playground-bad-field.png", full_page=True)

    page.fill("#field-width", "256")
    page.fill("#api-key", "fs_not_a_key")
    page.click("#generate")
    page.wait_for_selector("#error:has-text('API key')")  # a selector: the page's CSP allows no eval
    assert page.inner_text("#error") == "TT-API-KEY is not a valid API key"
    page.screenshot(path=ARTIFACTS / "playground-bad-key.png", full_page=True)
    page.close()


def test_words_the_bundled_model_does_not_know_are_noted_in_both_dialects(
    shipped: tuple[ServerProcess, str],
) -> None:
    server, key = shipped
    reseller = Api(server.base_url, key)
    body = {"prompt": "a purple giraffe in the center", "steps": 2, "width": 256, "height": 256}
    fetched = reseller.wait(reseller.job("flux-dev", body))
    assert fetched["status"] == "SUCCESS" and fetched["details"]["unknown_words"] == ["giraffe"]
    assert "'giraffe'" in fetched["details"]["note"]
    # Words it knows, in its own phrasing: nothing to note. In another order: what the model was given.
    own = "a purple star in the center on a white background"
    known = reseller.wait(reseller.job("flux-dev", {**body, "prompt": own}))
    assert "details" not in known
    reordered = reseller.wait(reseller.job("flux-dev", {**body, "prompt": "a purple star in the center"}))
    assert reordered["details"] == {"read_as": own}

    vendor = httpx.Client(base_url=server.base_url, headers={"x-key": key}, timeout=30)
    task = vendor.post("/v1/flux-dev", json=body).json()["id"]
    deadline = time.monotonic() + 60
    while (result := vendor.get("/v1/get_result", params={"id": task}).json())["status"] == "Pending":
        assert time.monotonic() < deadline, result
        time.sleep(0.1)
    assert result["status"] == "Ready" and result["details"]["unknown_words"] == ["giraffe"]


@needs_browser
def test_the_live_preview_shows_while_the_job_runs_then_gives_way_to_the_result(
    preview_server: ServerProcess, browser: Browser
) -> None:
    server, key = preview_server, str(preview_server.create_key("watcher", credits="100")["key"])
    page = _open(browser, server.base_url)
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")
    page.select_option("#model", "flux-dev")
    page.fill("#field-prompt", "a cat")
    page.fill("#field-steps", "50")
    page.fill("#field-width", "512")
    page.fill("#field-height", "512")
    page.press("#field-height", "Enter")
    page.wait_for_selector("#preview:not([hidden])", timeout=90_000)
    src = page.get_attribute("#preview-image", "src")
    assert src is not None and src.startswith("data:image/jpeg;base64,")
    page.screenshot(path=ARTIFACTS / "playground-preview.png", full_page=True)
    page.wait_for_selector("#result:not([hidden])", timeout=90_000)
    assert page.is_hidden("#preview")  # the result takes its place
    page.close()
