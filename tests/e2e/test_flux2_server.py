"""FLUX.2 and Fill on local weights end to end: a catalog naming tiny local weights folders, ``fluxserve
serve`` with a worker, and jobs in the vendor dialect that come back Ready with real images."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ServerProcess, catalog_env
from tests.e2e.test_vendor_server import VendorClient, download
from tests.support.engine_fixtures import gradient, png
from tests.support.tiny_pipelines import tiny_pipeline


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[VendorClient]:
    root = tmp_path_factory.mktemp("flux2-server")
    klein, fill = tiny_pipeline(models_dir, "tiny-flux2-klein"), tiny_pipeline(models_dir, "tiny-flux-fill")
    catalog = root / "catalog.toml"
    catalog.write_text(
        f'[models."flux-2-klein-4b"]\nweights = "{klein}"\nsteps = 2\n\n'
        f'[models."flux-pro-1.0-fill"]\nweights = "{fill}"\n'
    )
    # Nothing here tests recovery: a worker slow to import torch on a loaded machine is not hung.
    env = {**catalog_env(catalog), "FLUXSERVE_STALE_AFTER_SECONDS": "30"}
    server = ServerProcess(root / "data", models_dir, env)
    server.start()
    yield VendorClient(server.base_url, server.create_key("flux2")["key"])
    server.stop()


def test_klein_edits_a_reference_on_local_flux2_weights(client: VendorClient) -> None:
    body = {"prompt": "the fox, in winter", "input_image": b64(gradient((96, 64))), "width": 64, "height": 64}
    task = client.submit("flux-2-klein-4b", {**body, "seed": 5, "output_format": "png"})
    done = client.wait(task["polling_url"])
    assert done["status"] == "Ready", done
    image = download(done["result"]["sample"])
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert any(low != high for low, high in image.convert("RGB").getextrema())  # not a blank canvas


def test_fill_keeps_the_unmasked_pixels_through_the_worker(client: VendorClient) -> None:
    source = gradient((64, 48))
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (16, 16, 48, 32))
    body = {"prompt": "a hole", "image": b64(source), "mask": b64(mask), "steps": 15, "output_format": "png"}
    done = client.wait(client.submit("flux-pro-1.0-fill", body)["polling_url"])
    assert done["status"] == "Ready", done
    image = download(done["result"]["sample"]).convert("RGB")
    assert image.size == (64, 48)
    assert image.crop((0, 0, 64, 16)).tobytes() == source.crop((0, 0, 64, 16)).tobytes()
    assert image.crop((16, 16, 48, 32)).tobytes() != source.crop((16, 16, 48, 32)).tobytes()
