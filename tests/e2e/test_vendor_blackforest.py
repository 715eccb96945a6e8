"""The vendor's official Python client (``blackforest``), unmodified, against a real fluxserve.

``blackforest`` pins ``pillow==10.4.0``, which clashes with ours, so it lives in its own virtualenv,
``.venv-blackforest``, made by the test set-up (``make test``) rather than by the tests. The test uses
``FLUXSERVE_BLACKFOREST_PYTHON`` (default: that virtualenv's interpreter) and fails, naming the make
target, when it is missing or lacks the pinned client; it never installs anything.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import ServerProcess

BLACKFOREST_VERSION = "0.1.3"  # as installed by the Makefile's .venv-blackforest target
REPO = Path(__file__).resolve().parents[2]
MAKE_TARGET = ".venv-blackforest/bin/python"

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


def blackforest_python() -> Path:
    """The interpreter with the official client; fails (never installs, never skips) without one."""
    python = Path(os.environ.get("FLUXSERVE_BLACKFOREST_PYTHON") or REPO / MAKE_TARGET)
    setup = (
        f"run `make test` (or `make {MAKE_TARGET}` in {REPO}) to create it, or set "
        f"FLUXSERVE_BLACKFOREST_PYTHON to an interpreter with blackforest=={BLACKFOREST_VERSION}"
    )
    if not python.is_file():
        pytest.fail(f"no interpreter for the official blackforest client at {python}: {setup}", pytrace=False)
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('blackforest'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0 or probe.stdout.strip() != BLACKFOREST_VERSION:
        found = probe.stdout.strip() or (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"{python} lacks blackforest=={BLACKFOREST_VERSION} ({found}): {setup}", pytrace=False)
    return python


def fetch(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_official_client_generates_with_flux_dev_and_kontext_pro(
    server: ServerProcess, tmp_path: Path
) -> None:
    client_python = blackforest_python()
    key = server.create_key("blackforest", credits="50")["key"]
    reference = tmp_path / "reference.png"
    Image.new("RGB", (320, 240), (20, 90, 200)).save(reference)
    run = subprocess.run(
        [str(client_python), "-c", CLIENT_SCRIPT, server.base_url, key, str(reference)],
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
    assert (image.format, image.size) == ("PNG", (1184, 880))  # Kontext 4:3, as the 320x240 reference image

    credits = httpx.get(f"{server.base_url}/v1/credits", headers={"x-key": key}).json()
    assert credits == {"credits": 50 - 2.5 - 4, "unlimited": False}
