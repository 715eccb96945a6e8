"""The registry under a memory cap: least recently used models make room, one model is always kept."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from fluxserve.core.catalog import Catalog, load_catalog
from fluxserve.engines.flux.loading import FluxModel
from fluxserve.engines.registry import EngineRegistry, weights_size
from fluxserve.engines.tiny import build_tiny_flux
from fluxserve.settings import Settings
from fluxserve.worker.process import engine_registry
from tests.support.engine_fixtures import Recorder, request

ROUTES = ("flux-dev", "flux-pro", "flux-pro-1.1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three weights folders, one per route: a worker that switches models on every job."""
    root = tmp_path_factory.mktemp("weights")
    return {route: build_tiny_flux(root / route) for route in ROUTES}


def registry(folders: dict[str, Path], cap_models: float | None, tmp_path: Path) -> EngineRegistry:
    catalog = Catalog.model_validate(
        {"models": {route: {"weights": str(folder), "steps": 1} for route, folder in folders.items()}}
    )
    one = weights_size(folders["flux-dev"])
    return EngineRegistry(catalog, tmp_path, None if cap_models is None else int(one * cap_models))


def held(registry: EngineRegistry) -> list[str]:
    return [weights.name for weights, _ in registry.loaded]


def test_without_a_cap_every_model_stays(folders: dict[str, Path], tmp_path: Path) -> None:
    engines = registry(folders, None, tmp_path)
    for route in ROUTES:
        engines.get(route)
    assert held(engines) == list(ROUTES)


def test_the_least_recently_used_model_is_evicted(folders: dict[str, Path], tmp_path: Path) -> None:
    engines = registry(folders, 2.5, tmp_path)  # room for two
    dev = engines.get("flux-dev")
    engines.get("flux-pro")
    assert engines.get("flux-dev") is dev  # a hit touches flux-dev: flux-pro is now the oldest
    evicted = weakref.ref(engines.get("flux-pro").model)  # type: ignore[attr-defined]
    engines.get("flux-dev")
    engines.get("flux-pro-1.1")
    assert held(engines) == ["flux-dev", "flux-pro-1.1"]
    gc.collect()
    assert evicted() is None  # the weights were really let go
    assert sum(engines.loaded.values()) <= weights_size(folders["flux-dev"]) * 2.5


def test_a_cap_below_one_model_still_serves_each_in_turn(folders: dict[str, Path], tmp_path: Path) -> None:
    engines = registry(folders, 0.5, tmp_path)
    for route in (*ROUTES, "flux-dev"):
        result = engines.get(route).generate(request(route), Recorder().hooks)
        assert result.image.size == (64, 64)
        assert held(engines) == [route]


def test_a_job_running_on_an_evicted_model_finishes(folders: dict[str, Path], tmp_path: Path) -> None:
    engines = registry(folders, 1.5, tmp_path)
    dev = engines.get("flux-dev")
    model: FluxModel = dev.model  # type: ignore[attr-defined]
    engines.get("flux-pro")  # evicts flux-dev's model while this caller still holds its engine
    assert held(engines) == ["flux-pro"]
    assert dev.generate(request(), Recorder().hooks).image.size == (64, 64)
    assert engines.get("flux-dev").model is not model  # type: ignore[attr-defined]


def test_the_operator_sets_the_cap_in_mib(tmp_path: Path) -> None:
    catalog = load_catalog()
    capped = engine_registry(Settings(data_dir=tmp_path, model_memory_mb=512), catalog)
    assert capped.memory_cap_bytes == 512 * 2**20
    assert engine_registry(Settings(data_dir=tmp_path), catalog).memory_cap_bytes is None


def test_torch_threads_per_worker_process(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(torch_threads=3).threads_per_worker == 3
    # Default: the cores less one for the API, shared by the worker processes; at least one each.
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert Settings(workers=1).threads_per_worker == 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert Settings(workers=1).threads_per_worker == 15
    assert Settings(workers=4).threads_per_worker == 3
    assert Settings(workers=32).threads_per_worker == 1
