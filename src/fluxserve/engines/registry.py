"""Which engine serves a model name, made on first use and kept for the life of the process.

Every route whose catalog entry names the same weights folder (with the same loading options: dtype,
device, quantization...) shares one :class:`FluxModel`, so a process loads each set of weights once
however many routes point at it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from fluxserve.core.catalog import Catalog, ModelEntry
from fluxserve.engines.base import Engine, EngineError
from fluxserve.engines.diffusers_flux import DiffusersFluxEngine, FluxModel, FluxOptions, LoadOptions
from fluxserve.engines.tiny import build_tiny_flux

# Where the bundled model's weights ship inside the package (made by training/, see issue "bundled").
BUNDLED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "bundled"


class EngineRegistry:
    """Engines by model name, built lazily from the catalog; safe to call from several worker threads."""

    def __init__(self, catalog: Catalog, models_dir: Path) -> None:
        self._catalog = catalog
        self._models_dir = Path(models_dir)
        self._lock = threading.Lock()
        self._engines: dict[tuple[Path, str], Engine] = {}
        self._loaded: dict[tuple[Path, LoadOptions], FluxModel] = {}
        for model, entry in catalog.models.items():  # a mistyped knob stops the start, not a job later
            if entry.engine == "diffusers":
                try:
                    FluxOptions.of(entry)
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
        with self._lock:
            weights = self.resolve_weights(model, entry)
            key = (weights, entry.model_dump_json())
            engine = self._engines.get(key)
            if engine is None:
                load = FluxOptions.of(entry).load()
                loaded = self._loaded.get((weights, load))
                if loaded is None:
                    loaded = self._loaded[(weights, load)] = FluxModel(weights, load)
                engine = self._engines[key] = DiffusersFluxEngine(weights, entry, loaded)
            return engine

    def warm_up(self, models: Iterable[str] | None = None) -> dict[str, float]:
        """Load the engines of ``models`` (default: every diffusers model with ``warmup`` sizes) and run
        their warm-ups; call it when a worker starts. Returns the seconds each model took."""
        if models is None:
            models = [
                name
                for name, entry in self._catalog.models.items()
                if entry.engine == "diffusers" and FluxOptions.of(entry).warmup
            ]
        timings: dict[str, float] = {}
        for model in models:
            engine = self.get(model)
            if isinstance(engine, DiffusersFluxEngine):
                timings[model] = engine.warm_up(model)
        return timings

    def resolve_weights(self, model: str, entry: ModelEntry) -> Path:
        """The folder ``entry.weights`` names; ``builtin:`` weights are made or found here."""
        if not entry.weights:
            raise EngineError(f"{model}: the catalog names no weights for it")
        if entry.weights == "builtin:tiny":
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

    def _relay(self, model: str, entry: ModelEntry) -> Engine:
        """The relay engine (issue 4) plugs in here."""
        raise EngineError("relay engine not available")
