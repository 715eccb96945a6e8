"""The full-size GPU path (issue 24), checked on this CPU: weights folders in the vendor's layout load
through the engines' code, fp8 compute is refused where there is no fp8 GPU, and ``bench/gpu.py`` runs at
tiny dimensions so that it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from fluxserve.engines.flux.engine import DiffusersFluxEngine
from fluxserve.engines.flux.flux2 import Flux2Engine, Flux2Model
from fluxserve.errors import EngineError
from tests.support.engine_fixtures import Recorder, entry, png, request, tiny_weights
from tests.support.tiny_pipelines import tiny_pipeline

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
ROOT = Path(__file__).resolve().parents[2]


def vendor_layout(folder: Path, chat_template: str | None = "json") -> Path:
    """Rewrite a saved FLUX.2 [dev] folder as the vendor ships it: its ``tokenizer`` component a
    PixtralProcessor (processor and image processor configs beside the tokenizer, the chat template in
    ``chat_template.json``)."""
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    tokenizer = folder / "tokenizer"
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps({**config, "processor_class": "PixtralProcessor"})
    )
    processor = {"image_token": "[IMG]", "patch_size": 8, "processor_class": "PixtralProcessor"}
    (tokenizer / "processor_config.json").write_text(json.dumps(processor))
    image = {"image_processor_type": "PixtralImageProcessor", "patch_size": {"height": 8, "width": 8}}
    (tokenizer / "preprocessor_config.json").write_text(json.dumps(image))
    template = (tokenizer / "chat_template.jinja").read_text()
    (tokenizer / "chat_template.jinja").unlink()
    if chat_template == "json":
        (tokenizer / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return folder


def test_flux2_dev_in_the_vendors_layout_loads_without_torchvision(models_dir: Path, tmp_path: Path) -> None:
    tiny = tiny_pipeline(models_dir, "tiny-flux2-dev")
    folder = vendor_layout(shutil.copytree(tiny, tmp_path / "FLUX.2-dev"))
    if not HAS_TORCHVISION:  # what the stock loader does with it here
        from diffusers import Flux2Pipeline

        with pytest.raises(ValueError, match="pixtral"):
            Flux2Pipeline.from_pretrained(folder)
    vendor, ours = Flux2Model(folder), Flux2Model(tiny)
    assert type(vendor.pipe.tokenizer) is type(ours.pipe.tokenizer)
    assert vendor.max_sequence_length == ours.max_sequence_length
    same = request("flux-2-pro", prompt="a lighthouse at dusk", seed=5)
    images = [
        Flux2Engine(m.weights, entry(), m).generate(same, Recorder().hooks).image for m in (vendor, ours)
    ]
    assert png(images[0]) == png(images[1])  # the same tokens reached the same weights


def test_a_processor_folder_without_its_chat_template_is_refused(models_dir: Path, tmp_path: Path) -> None:
    tiny = tiny_pipeline(models_dir, "tiny-flux2-dev")
    folder = vendor_layout(shutil.copytree(tiny, tmp_path / "FLUX.2-dev"), chat_template=None)
    with pytest.raises(EngineError, match=r"tokenizer: no chat template \(chat_template.json"):
        Flux2Model(folder)


def test_fp8_compute_is_refused_without_an_fp8_gpu(models_dir: Path) -> None:
    pytest.importorskip("torchao")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has an fp8 GPU")
    with pytest.raises(EngineError, match=r"^options.quantize='fp8-compute': .*compute capability"):
        DiffusersFluxEngine(tiny_weights(models_dir), entry(options={"quantize": "fp8-compute"}))


def test_a_variant_this_machine_cannot_run_is_reported_not_fatal(tmp_path: Path) -> None:
    from bench.gpu import build, direct, plan

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tiny = plan(tiny=True)
    runs = direct(build("flux1-dev", tmp_path, tiny), "flux1-dev", "compile+fp8", tiny)
    assert [r.batch for r in runs] == [1, 2]
    assert all(
        r.seconds_per_image is None and "options.quantize='fp8-compute'" in (r.error or "") for r in runs
    )
