"""The vendor's official Python client (``blackforest``), unmodified, against a real fluxserve.

``blackforest`` pins ``pillow==10.4.0``, which clashes with ours, so it lives in its own virtualenv
(``--system-site-packages`` for the rest), made once in pytest's cache directory (a temporary one when
the cache is off). ``FLUXSERVE_BLACKFOREST_PYTHON`` may name a ready interpreter instead.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fluxserve.core.sizes import kontext_size
from tests.conftest import ServerProcess

BLACKFOREST = "blackforest==0.1.3"

CLIENT_SCRIPT = r"""
import json, sys
from blackforest import BFLClient
from blackforest.types.general.client_config import ClientConfig

base_url, key, reference = sys.argv[1:4]
client = BFLClient(api_key=key, base_url=base_url)
config = ClientConfig(sync=True, polling_interval=0.1, max_retries=1200)
dev_inputs = {"prompt": "a lighthouse at dusk", "width": 320, "height": 256, "steps": 4, "seed": 11}
dev = client.generate("flux-dev", dev_inputs, config)
# input_image as a file path: the client itself reads and base64-encodes it.
kontext_inputs = {"prompt": "make it snow", "input_image": reference, "seed": 12}
kontext = client.generate("flux-kontext-pro", kontext_inputs, config)
print("RESULT " + json.dumps({"dev": dev.result, "kontext": kontext.result}))
"""


@pytest.fixture(scope="session")
def blackforest_python(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    override = os.environ.get("FLUXSERVE_BLACKFOREST_PYTHON")
    if override:
        return Path(override)
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    venv = Path(cache.mkdir("blackforest-venv")) if cache else tmp_path_factory.mktemp("blackforest-venv")
    python = venv / "bin" / "python"
    marker = venv / "installed.txt"
    if not (marker.is_file() and marker.read_text() == BLACKFOREST and python.exists()):
        shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", BLACKFOREST], capture_output=True, text=True
        )
        assert install.returncode == 0, f"could not install {BLACKFOREST}: {install.stderr[-2000:]}"
        marker.write_text(BLACKFOREST)
    return python


def fetch(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_official_client_generates_with_flux_dev_and_kontext_pro(
    server: ServerProcess, blackforest_python: Path, tmp_path: Path
) -> None:
    key = server.create_key("blackforest", credits="50")["key"]
    reference = tmp_path / "reference.png"
    Image.new("RGB", (320, 240), (20, 90, 200)).save(reference)
    run = subprocess.run(
        [str(blackforest_python), "-c", CLIENT_SCRIPT, server.base_url, key, str(reference)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    results = json.loads(line.removeprefix("RESULT "))

    dev = results["dev"]
    assert (dev["prompt"], dev["seed"]) == ("a lighthouse at dusk", 11)
    image = fetch(dev["sample"])
    assert (image.format, image.size) == ("JPEG", (320, 256))  # the client asks for jpeg by default

    kontext = results["kontext"]
    assert kontext["seed"] == 12
    image = fetch(kontext["sample"])
    assert (image.format, image.size) == ("PNG", kontext_size(320 / 240))  # follows the reference image

    credits = httpx.get(f"{server.base_url}/v1/credits", headers={"x-key": key}).json()
    assert credits == {"credits": 50 - 2.5 - 4, "unlimited": False}
