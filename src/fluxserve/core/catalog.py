"""The model catalog: which engine and weights serve each API model name.

Shipped defaults live in ``catalog.toml`` beside this module; operator files named by ``FLUXSERVE_CATALOG``
(several joined with ``os.pathsep``, later ones winning) override them key by key, model by model, so a
site-wide file and a per-machine file can be layered.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fluxserve.core.models import MODELS

DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")
# Where the bundled model's weights (``builtin:bundled``, made by training/) and its shipped finetunes are.
WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
BUNDLED_WEIGHTS = WEIGHTS / "bundled"


class ModelEntry(BaseModel):
    """One API model. ``options`` carries engine-specific knobs (dtype, compile, relay URL...)."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["diffusers", "relay"] = "diffusers"
    weights: str | None = Field(
        default=None,
        description="Folder of a diffusers FLUX checkpoint, or 'builtin:<name>' for a model we make or ship.",
    )
    steps: int | None = Field(
        default=None, description="The model's steps: used unless the request names its own steps."
    )
    guidance: float | None = Field(
        default=None, description="The model's guidance: used unless the request names its own guidance."
    )
    max_pixels: int | None = Field(
        default=None,
        description="Generate at most this many pixels (same aspect) and resize to the requested size.",
    )
    max_input_pixels: int = Field(default=4096 * 4096, description="Largest input image accepted.")
    options: dict[str, Any] = Field(default_factory=dict)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelEntry]

    def entry(self, model: str) -> ModelEntry:
        return self.models[model]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read(path: Path) -> dict[str, Any]:
    """One catalog file, its relative weight paths made absolute against the file's own folder."""
    data = tomllib.loads(path.read_text())
    for entry in data.get("models", {}).values():
        weights = entry.get("weights") if isinstance(entry, dict) else None
        if isinstance(weights, str) and weights and not weights.startswith("builtin:"):
            local = Path(weights).expanduser()
            entry["weights"] = str(local if local.is_absolute() else (path.parent / local).resolve())
    return data


def _override_entry(base: Any, entry: Any) -> Any:
    """A model entry that names other weights or another engine replaces the one below it whole: steps,
    max_pixels and options tuned for those weights (the bundled model's true CFG, its 128x128 budget) must
    not leak onto real FLUX weights or a relay. Otherwise it overrides key by key."""
    if not (isinstance(base, dict) and isinstance(entry, dict)):
        return entry
    for key, default in (("engine", "diffusers"), ("weights", None)):
        if key in entry and entry[key] != base.get(key, default):
            return entry
    return _merge(base, entry)


def load_catalog(overrides: Sequence[Path] = ()) -> Catalog:
    """Read the shipped catalog and apply the operator's files in order; a finetuned route without an entry
    takes its base model's."""
    data = _read(DEFAULT_CATALOG)
    for path in overrides:
        layer = _read(path)
        models = dict(data.get("models", {}))
        for name, entry in layer.pop("models", {}).items():
            models[name] = _override_entry(models.get(name), entry)
        data = {**_merge(data, layer), "models": models}
    # A finetuned route without its own entry runs on its base model's (same weights, steps, options), so
    # the adapters of both share one loaded model.
    models = data.get("models", {})
    for name, spec in MODELS.items():
        if spec.base and name not in models and spec.base in models:
            models[name] = models[spec.base]
    catalog = Catalog.model_validate(data)
    missing = [name for name in MODELS if name not in catalog.models]
    if missing:
        raise ValueError(f"catalog: no entry for {', '.join(missing)}")
    unknown = [name for name in catalog.models if name not in MODELS]
    if unknown:
        raise ValueError(f"catalog: {', '.join(unknown)} not in the model table (known: {', '.join(MODELS)})")
    return catalog
