"""Finetunes through a real ``fluxserve serve``: added with the CLI (and refused when the file does not fit),
used by name on the vendor's finetuned routes, seen only by the keys they belong to, deleted over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.numpy import save_file

from tests.conftest import ServerProcess
from tests.support.engine_fixtures import tiny_weights
from tests.support.loras import make_lora


@pytest.fixture(scope="module")
def lora(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(tiny_weights(models_dir), tmp_path_factory.mktemp("lora"), scale=8.0)


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxserve", *args, "--data-dir", str(server.data_dir)],
        env=server.env, capture_output=True, text=True,
    )  # fmt: skip


def add(server: ServerProcess, file: Path, *extra: str) -> str:
    name = f"ft-{uuid.uuid4().hex[:8]}"
    done = cli(server, "finetunes", "add", name, str(file), "--model", "flux-pro", *extra)
    assert done.returncode == 0, done.stderr
    return name


def vendor(server: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"x-key": key}, timeout=30)


def generate(client: httpx.Client, model: str, body: dict[str, Any]) -> dict[str, Any]:
    submitted = client.post(f"/v1/{model}", json=body)
    assert submitted.status_code == 200, submitted.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        result = client.get(submitted.json()["polling_url"]).json()
        if result["status"] != "Pending":
            return result
        time.sleep(0.05)
    raise AssertionError(f"{model} still Pending")


def sample(result: dict[str, Any]) -> bytes:
    assert result["status"] == "Ready", result
    return httpx.get(result["result"]["sample"], timeout=30).content


BODY = {"prompt": "a red circle", "seed": 5, "steps": 2, "width": 256, "height": 256, "output_format": "png"}


def test_a_key_uses_its_own_and_the_shared_finetunes_and_no_other_keys(
    server: ServerProcess, lora: Path
) -> None:
    owner, other = server.create_key(), server.create_key()
    own = add(server, lora, "--key", owner["name"])
    shared = add(server, lora, "--comment", "for everyone")
    mine, theirs = vendor(server, owner["key"]), vendor(server, other["key"])
    assert {own, shared} <= set(mine.get("/v1/my_finetunes").json()["finetunes"])
    listed = theirs.get("/v1/my_finetunes").json()["finetunes"]
    assert shared in listed and own not in listed

    refused = theirs.post("/v1/flux-pro-finetuned", json={**BODY, "finetune_id": own})
    assert refused.status_code == 404
    assert own in refused.json()["detail"] and "my_finetunes" in refused.json()["detail"]
    assert theirs.get("/v1/finetune_details", params={"finetune_id": own}).status_code == 404
    wrong_model = mine.post("/v1/flux-2-klein-4b-finetuned", json={**BODY, "finetune_id": own})
    assert wrong_model.status_code == 422
    assert wrong_model.json()["detail"][0]["loc"] == ["body", "finetune_id"]

    base = sample(generate(mine, "flux-pro", BODY))
    tuned = generate(mine, "flux-pro-finetuned", {**BODY, "finetune_id": own, "finetune_strength": 1})
    assert sample(tuned) != base
    off = generate(mine, "flux-pro-finetuned", {**BODY, "finetune_id": own, "finetune_strength": 0})
    assert sample(off) == base, "strength 0 is the base model, bit for bit"
    assert sample(generate(theirs, "flux-pro-finetuned", {**BODY, "finetune_id": shared})) != base

    details = mine.get("/v1/finetune_details", params={"finetune_id": own}).json()["finetune_details"]
    assert (details["finetune_id"], details["model"], details["scope"], details["rank"]) == (
        own, "flux-pro", "this key", 4,
    )  # fmt: skip


def test_a_key_deletes_its_own_finetunes_only(server: ServerProcess, lora: Path) -> None:
    owner, other = server.create_key(), server.create_key()
    own, shared = add(server, lora, "--key", owner["name"]), add(server, lora)
    mine, theirs = vendor(server, owner["key"]), vendor(server, other["key"])
    assert theirs.post("/v1/delete_finetune", json={"finetune_id": own}).status_code == 404
    assert mine.post("/v1/delete_finetune", json={"finetune_id": shared}).status_code == 403
    deleted = mine.post("/v1/delete_finetune", json={"finetune_id": own})
    assert deleted.status_code == 200
    body = deleted.json()
    assert (body["status"], body["deleted_finetune_id"]) == ("success", own) and body["timestamp"]
    assert own not in mine.get("/v1/my_finetunes").json()["finetunes"]
    assert shared in cli(server, "finetunes", "list", "--json").stdout
    refused = mine.post("/v1/flux-pro-finetuned", json={**BODY, "finetune_id": own})
    assert refused.status_code == 404


def test_the_finetuned_routes_require_a_finetune_id(server: ServerProcess) -> None:
    client = vendor(server, server.create_key()["key"])
    response = client.post("/v1/flux-pro-1.1-ultra-finetuned", json={"prompt": "x", "finetune_strength": 3})
    assert response.status_code == 422
    messages = {item["msg"] for item in response.json()["detail"]}
    assert "finetune_id: is required" in messages
    assert "finetune_strength: must be a number between 0 and 2" in messages


@pytest.mark.parametrize(
    ("tensors", "extra", "message"),
    [
        (None, (), "not a safetensors file"),
        ({"unet.down.weight": (4, 4)}, (), "is not a LoRA weight"),
        ({"transformer.x_embedder.lora_A.weight": (4, 32)}, (), "has no lora_B.weight"),
        (
            {"transformer.x_embedder.lora_A.weight": (4, 8), "transformer.x_embedder.lora_B.weight": (8, 4)},
            (),
            "it was trained for other weights",
        ),
        (
            {"transformer.nowhere.lora_A.weight": (4, 8), "transformer.nowhere.lora_B.weight": (8, 4)},
            (),
            "is not a layer of the model's transformer",
        ),
        ({"transformer.a.lora_A.weight": (512, 1024)}, ("--max-mb", "1"), "above the limit"),
    ],
)
def test_the_cli_refuses_files_that_are_no_adapter_for_the_model(
    server: ServerProcess,
    tmp_path: Path,
    tensors: dict[str, tuple[int, int]] | None,
    extra: tuple[str, ...],
    message: str,
) -> None:
    import numpy as np

    file = tmp_path / "adapter.safetensors"
    if tensors is None:
        file.write_bytes(b"this is no safetensors file")
    else:
        save_file({name: np.zeros(shape, dtype=np.float32) for name, shape in tensors.items()}, file)
    done = cli(server, "finetunes", "add", "bad", str(file), "--model", "flux-pro", *extra)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr
    assert "bad" not in cli(server, "finetunes", "list", "--json").stdout


def test_the_cli_refuses_a_model_without_finetuned_routes_and_a_taken_name(
    server: ServerProcess, lora: Path
) -> None:
    done = cli(server, "finetunes", "add", "x", str(lora), "--model", "flux-dev")
    assert done.returncode == 1 and "--model: 'flux-dev' has no finetuned route" in done.stderr
    name = add(server, lora)
    again = cli(server, "finetunes", "add", name, str(lora), "--model", "flux-pro")
    assert again.returncode == 1 and "exists" in again.stderr
    removed = cli(server, "finetunes", "remove", name)
    assert removed.returncode == 0
    assert cli(server, "finetunes", "remove", name).returncode == 1
