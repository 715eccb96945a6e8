"""An install without the ``local`` extra, served for real: an API replica (``serve --no-workers``) and the
CLI run with torch, diffusers and transformers refused by an import hook, and a worker that only relays
(``--models`` of relay entries) claims and finishes a job through the fake vendor without them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Api, ServerProcess, catalog_env
from tests.support.fake_vendor import FAKE_KEY, FakeVendor
from tests.support.no_model_stack import without_model_stack

KEY_ENV = "FLUXSERVE_TEST_UPSTREAM_KEY"


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    with FakeVendor() as fake:
        yield fake


def test_an_api_replica_and_a_relay_worker_run_without_the_model_stack(
    vendor: FakeVendor, tmp_path: Path, models_dir: Path
) -> None:
    catalog = tmp_path / "relay.toml"
    catalog.write_text(
        f'[models."flux-kontext-max"]\nengine = "relay"\n\n[models."flux-kontext-max".options]\n'
        f'base_url = "{vendor.base_url}"\napi_key_env = "{KEY_ENV}"\npoll_interval = 0.05\n'
    )
    env = {**without_model_stack(tmp_path / "hook"), **catalog_env(catalog), KEY_ENV: FAKE_KEY}
    server = ServerProcess(tmp_path / "data", models_dir, env)
    server.start("--no-workers")
    worker = subprocess.Popen(
        [sys.executable, "-m", "fluxserve", "worker", "--models", "flux-kontext-max",
         "--data-dir", str(server.data_dir)],
        env=server.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        api = Api(server.base_url, server.create_key("light", credits="100")["key"])  # the CLI, hooked too
        job = api.job("flux-kontext-max", {"prompt": "a lighthouse at dusk", "seed": 5})
        assert api.wait(job, timeout=120)["status"] == "SUCCESS"
        assert api.image(api.fetch(job)).size[0] > 0
        assert vendor.seen.submits[-1][0] == "flux-kontext-max"
        assert worker.poll() is None  # still claiming
    finally:
        worker.terminate()
        output = worker.communicate(timeout=60)[0].decode()
        server.stop()
    assert "blocked by the test" not in output and "Traceback" not in output, output
    assert "blocked by the test" not in server.log_path.read_text()
