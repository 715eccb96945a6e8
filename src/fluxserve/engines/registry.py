"""Which engine serves a model name, made on first use and kept while memory allows.

Every route whose catalog entry names the same weights folder (with the same loading options: dtype,
device, quantization...) shares one :class:`FluxModel`, so a process loads each set of weights once
however many routes point at it. Under a memory cap, loading a model first evicts the least recently
used others until the new one fits (estimated by its weight files); one model is always kept.

The pipeline a weights folder holds (its ``model_index.json``) picks the engine: FLUX.2 folders serve the
FLUX.2 routes (:mod:`~fluxserve.engines.flux.flux2`), FLUX.1 Fill folders the fill and expand routes
(:mod:`~fluxserve.engines.flux.fill`), and FLUX.1 folders the rest (:mod:`~fluxserve.engines.flux.engine`),
the FLUX.2, fill and expand routes included through :mod:`~fluxserve.engines.standin` (the shipped catalog
serves every route with the bundled FLUX.1 model).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from fluxserve.core.catalog import BUNDLED_WEIGHTS, Catalog, ModelEntry
from fluxserve.core.models import Family, spec_of
from fluxserve.engines.base import Engine
from fluxserve.engines.flux.options import FluxOptions, LoadOptions
from fluxserve.engines.standin import FAMILIES as STAND_IN_FAMILIES
from fluxserve.engines.standin import StandInEngine
from fluxserve.errors import EngineError

# The local engines import torch, diffusers and transformers (the ``local`` extra): imported on the first
# diffusers model only, so that a worker whose catalog only relays runs without them.
if TYPE_CHECKING:
    from fluxserve.engines.flux.engine import DiffusersFluxEngine
    from fluxserve.engines.flux.fill import FillEngine
    from fluxserve.engines.flux.flux2 import Flux2Engine
    from fluxserve.engines.flux.loading import FluxModel, LoadedPipeline

__all__ = ["BUNDLED_WEIGHTS", "EngineRegistry"]
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf"}

log = logging.getLogger("fluxserve.engines")


@functools.cache
def single_pipelines() -> dict[str, tuple[type[LoadedPipeline], frozenset[Family]]]:
    """Weights folders holding these pipelines load as these models (each with its engine, see _engine),
    for the routes of these families only; any other folder is FLUX.1's."""
    from fluxserve.engines.flux.fill import FillModel
    from fluxserve.engines.flux.flux2 import Flux2Model

    return {
        **dict.fromkeys(Flux2Model.PIPELINES, (Flux2Model, frozenset({Family.FLUX2, Family.FLUX2_KLEIN}))),
        **dict.fromkeys(FillModel.PIPELINES, (FillModel, frozenset({Family.FILL, Family.EXPAND}))),
    }


def pipeline_class(weights: Path) -> str:
    """The diffusers pipeline class a weights folder holds, from its ``model_index.json``."""
    try:
        name = json.loads((weights / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"{weights}/model_index.json: unreadable ({exc})") from None
    return str(name)


def weights_size(folder: Path) -> int:
    """Bytes of the weight files under ``folder``: what loading it will take, before loading it."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())


class EngineRegistry:
    """Engines by model name, built lazily from the catalog; safe to call from several worker threads.

    ``memory_cap_bytes`` (None: no cap) bounds the weights held at once, for workers that switch models.
    """

    def __init__(self, catalog: Catalog, models_dir: Path, memory_cap_bytes: int | None = None) -> None:
        self._catalog = catalog
        self._models_dir = Path(models_dir)
        self._cap = memory_cap_bytes
        self._lock = threading.Lock()
        self._engines: dict[tuple[Path, str], DiffusersFluxEngine | Flux2Engine | FillEngine] = {}
        # least recent first
        self._loaded: OrderedDict[tuple[Path, LoadOptions], FluxModel | LoadedPipeline] = OrderedDict()
        self._routes: dict[str, tuple[Path, LoadOptions]] = {}  # model name -> what it ran on last
        for model, entry in catalog.models.items():  # a mistyped knob stops the start, not a job later
            if entry.engine == "diffusers":
                try:
                    options = FluxOptions.of(entry)
                    folder = Path(entry.weights or "")
                    on_disk = (folder / "model_index.json").is_file()
                    if on_disk and (kind := pipeline_class(folder)) in single_pipelines():
                        options.single_pipeline(kind)
                except EngineError as exc:
                    raise EngineError(f"{model}: {exc}") from None

    def get(self, model: str) -> Engine:
        """The engine for an API model name; the first call for a weights folder loads it."""
        try:
            entry = self._catalog.entry(model)
        except KeyError:
            raise EngineError(f"model {model!r} is not in the catalog") from None
        if entry.engine == "relay":
            return self._relay(model, entry)
        from fluxserve.engines.flux.engine import DiffusersFluxEngine
        from fluxserve.engines.flux.loading import FluxModel

        with self._lock:
            weights = self.resolve_weights(model, entry)
            load = self._resolve_load(model, FluxOptions.of(entry).load())
            kind = pipeline_class(weights)
            model_class, families = single_pipelines().get(kind, (FluxModel, None))
            if families is not None and spec_of(model).family not in families:
                served = ", ".join(sorted(families))
                raise EngineError(
                    f"{model}: {weights} holds {kind} weights, which serve {served} routes only"
                )
            loaded = self._loaded.get((weights, load))
            if loaded is None:
                loaded = self._load(weights, load, model_class)
            self._loaded.move_to_end((weights, load))
            self._routes[model] = (weights, load)
            key = (weights, entry.model_dump_json())
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = self._engine(weights, entry, loaded)
            if isinstance(engine, DiffusersFluxEngine) and spec_of(model).family in STAND_IN_FAMILIES:
                return StandInEngine(engine)  # FLUX.1 weights on a FLUX.2/fill/expand route
            return engine

    @staticmethod
    def _engine(
        weights: Path, entry: ModelEntry, loaded: FluxModel | LoadedPipeline
    ) -> DiffusersFluxEngine | Flux2Engine | FillEngine:
        """The engine for a route on a loaded model: the model's kind decides."""
        from fluxserve.engines.flux.engine import DiffusersFluxEngine
        from fluxserve.engines.flux.fill import FillEngine, FillModel
        from fluxserve.engines.flux.flux2 import Flux2Engine, Flux2Model
        from fluxserve.engines.flux.loading import FluxModel

        if isinstance(loaded, Flux2Model):
            return Flux2Engine(weights, entry, loaded)
        if isinstance(loaded, FillModel):
            return FillEngine(weights, entry, loaded)
        assert isinstance(loaded, FluxModel)
        return DiffusersFluxEngine(weights, entry, loaded)

    def resident(self) -> list[str]:
        """The model names served so far whose weights are still in memory: the jobs a worker should
        prefer (see :meth:`~fluxserve.jobs.store.Claims.claim`), as they run without a load.

        Without the lock, which a load holds for minutes: a worker thread asks before each claim. The
        copy and the membership tests are single operations on the dicts, so they never see one half
        changed."""
        return [model for model, key in dict(self._routes).items() if key in self._loaded]

    @property
    def memory_cap_bytes(self) -> int | None:
        return self._cap

    @property
    def loaded(self) -> dict[tuple[Path, LoadOptions], int]:
        """The models in memory, least recently used first, with the bytes each holds."""
        with self._lock:
            return {key: model.nbytes for key, model in self._loaded.items()}

    def _load(
        self, weights: Path, load: LoadOptions, model_class: type[FluxModel | LoadedPipeline]
    ) -> FluxModel | LoadedPipeline:
        if self._cap is not None:
            self._evict(self._cap - weights_size(weights))
        model = self._loaded[(weights, load)] = model_class(weights, load)
        if self._cap is not None:
            self._evict(self._cap - model.nbytes, keep=model)
        return model

    def _evict(self, budget: int, keep: FluxModel | LoadedPipeline | None = None) -> None:
        """Drop least recently used models until the others hold at most ``budget`` bytes.

        A job still running on an evicted model finishes; its memory is freed when it lets go.
        """
        held = {key: model.nbytes for key, model in self._loaded.items() if model is not keep}
        evicted = False
        for key in list(held):
            if sum(held.values()) <= budget:
                break
            gone = self._loaded.pop(key)
            self._engines = {k: e for k, e in self._engines.items() if e.model is not gone}
            del gone
            log.info("evicted model", extra={"weights": str(key[0]), "bytes": held.pop(key)})
            evicted = True
        if evicted:
            import torch

            gc.collect()  # pipelines and their hooks hold reference cycles
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def warm_up(self, models: Iterable[str] | None = None) -> dict[str, float]:
        """Load the engines of ``models`` (default: every diffusers model with ``warmup`` sizes) and run
        their warm-ups; call it when a worker starts. Returns the seconds each model took."""
        if models is None:
            models = [
                name
                for name, entry in self._catalog.models.items()
                if entry.engine == "diffusers" and FluxOptions.of(entry).warmup
            ]
        from fluxserve.engines.flux.engine import DiffusersFluxEngine
        from fluxserve.engines.flux.fill import FillEngine
        from fluxserve.engines.flux.flux2 import Flux2Engine

        timings: dict[str, float] = {}
        for model in models:
            engine = self.get(model)
            if isinstance(engine, DiffusersFluxEngine | Flux2Engine | FillEngine):
                timings[model] = engine.warm_up(model)
        return timings

    def resolve_weights(self, model: str, entry: ModelEntry) -> Path:
        """The folder ``entry.weights`` names; ``builtin:`` weights are made or found here."""
        if not entry.weights:
            raise EngineError(f"{model}: the catalog names no weights for it")
        if entry.weights == "builtin:tiny":
            from fluxserve.engines.tiny import build_tiny_flux

            return build_tiny_flux(self._models_dir / "tiny")
        if entry.weights == "builtin:bundled":
            if not (BUNDLED_WEIGHTS / "model_index.json").is_file():
                raise EngineError(f"{model}: bundled weights not installed (no {BUNDLED_WEIGHTS})")
            return BUNDLED_WEIGHTS
        if entry.weights.startswith("builtin:"):
            known = "builtin:tiny, builtin:bundled"
            raise EngineError(f"{model}: unknown built-in weights {entry.weights!r} (known: {known})")
        folder = Path(entry.weights)
        if not (folder / "model_index.json").is_file():
            raise EngineError(f"{model}: {folder} is not a diffusers pipeline folder (no model_index.json)")
        return folder

    def _resolve_load(self, model: str, load: LoadOptions) -> LoadOptions:
        """Loading options with built-in names made into folders (``redux = "builtin:tiny-redux"``)."""
        if load.redux == "builtin:tiny-redux":
            from fluxserve.engines.tiny import build_tiny_redux

            return load.model_copy(update={"redux": str(build_tiny_redux(self._models_dir / "tiny-redux"))})
        if load.redux and load.redux.startswith("builtin:"):
            raise EngineError(
                f"{model}: options.redux: unknown built-in {load.redux!r} (known: builtin:tiny-redux)"
            )
        return load

    def _relay(self, model: str, entry: ModelEntry) -> Engine:
        """The relay engine (issue 4) plugs in here."""
        from fluxserve.engines.relay.engine import RelayEngine

        return RelayEngine(entry, model)
