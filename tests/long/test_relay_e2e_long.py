"""The long scenario of test_relay_e2e.py (make test-long)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Api, ServerProcess, catalog_env
from tests.e2e.test_relay_e2e import KEY_ENV, catalog, eventually, image_at
from tests.support.fake_vendor import FAKE_KEY, FakeVendor, _color


def test_a_server_killed_mid_relay_resumes_the_same_upstream_task(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 while the vendor is still working: after the restart the job finishes from the task it
    already paid for, without submitting a second one."""
    with FakeVendor() as vendor:
        vendor.pending_polls = 1_000_000
        catalog_file = tmp_path / "relay.toml"
        catalog_file.write_text(catalog(vendor.base_url))
        server: ServerProcess = make_server({**catalog_env(catalog_file), KEY_ENV: FAKE_KEY})
        server.start()
        api = Api(server.base_url, server.create_key("k", credits="100")["key"])
        job_id = api.job("flux-kontext-max", {"prompt": "a lighthouse", "seed": 11})
        eventually(lambda: len(vendor.seen.polls) >= 2)
        server.kill()
        vendor.pending_polls = 0
        server.start()
        body = api.wait(job_id, timeout=60)
        assert body["status"] == "SUCCESS", body
        assert len(vendor.seen.submits) == 1
        assert image_at(body["data"]["imageUrl"]).getpixel((5, 5)) == _color(11)
