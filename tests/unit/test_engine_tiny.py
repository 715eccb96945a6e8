"""The tiny FLUX pipeline: built offline, deterministic, idempotent, and safe to build concurrently."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from diffusers import FluxKontextPipeline, FluxPipeline

from fluxserve.engines.tiny import MARKER, RECIPE, build_tiny_flux, is_built


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_builds_fast_and_loads_with_both_pipelines(tmp_path: Path) -> None:
    started = time.monotonic()
    folder = build_tiny_flux(tmp_path / "tiny")
    assert time.monotonic() - started < 5
    assert is_built(folder)
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.vae_scale_factor == 8  # four VAE blocks: the real FLUX downsampling
    assert FluxKontextPipeline.from_pretrained(folder).transformer.config.in_channels == 16


def test_weights_are_deterministic_and_a_complete_build_is_reused(tmp_path: Path) -> None:
    first, second = build_tiny_flux(tmp_path / "a"), build_tiny_flux(tmp_path / "b")
    assert files(first) == files(second)
    stamp = (first / "transformer").stat().st_mtime_ns
    assert build_tiny_flux(first) == first
    assert (first / "transformer").stat().st_mtime_ns == stamp


def test_an_incomplete_or_outdated_folder_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")  # an interrupted copy: no marker
    build_tiny_flux(folder)
    assert is_built(folder)
    (folder / MARKER).write_text(json.dumps({"recipe": RECIPE + "-old"}))
    build_tiny_flux(folder)
    assert is_built(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging folders left behind


def test_concurrent_builds_agree(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    errors: list[BaseException] = []

    def build() -> None:
        try:
            build_tiny_flux(folder)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert is_built(folder)
    assert files(folder) == files(build_tiny_flux(tmp_path / "reference"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "tiny"]
