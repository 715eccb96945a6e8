"""The model catalog: which engine and weights serve each API model name.

Shipped defaults live in ``catalog.toml`` beside this module; an operator file named by
``FLUXSERVE_CATALOG`` overrides them key by key, model by model.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MODELS = (
    "flux-kontext-max",
    "flux-kontext-pro",
    "flux-pro-1.1-ultra",
    "flux-pro-1.1",
    "flux-pro",
    "flux-dev",
)
KONTEXT_MODELS = ("flux-kontext-max", "flux-kontext-pro")

DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")


class ModelEntry(BaseModel):
    """One API model. ``options`` carries engine-specific knobs (dtype, compile, relay URL...)."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["diffusers", "relay"] = "diffusers"
    weights: str | None = Field(
        default=None,
        description="Folder of a diffusers FLUX checkpoint, or 'builtin:<name>' for a model we make or ship.",
    )
    steps: int | None = Field(default=None, description="Steps when the route has no steps field.")
    guidance: float | None = Field(default=None, description="Guidance when the route has none.")
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


def load_catalog(override: Path | None = None) -> Catalog:
    """Read the shipped catalog, apply the operator's file, and resolve relative weight paths."""
    data = tomllib.loads(DEFAULT_CATALOG.read_text())
    base_dir = DEFAULT_CATALOG.parent
    if override is not None:
        data = _merge(data, tomllib.loads(override.read_text()))
        base_dir = override.parent
    catalog = Catalog.model_validate(data)
    missing = [name for name in MODELS if name not in catalog.models]
    if missing:
        raise ValueError(f"catalog: no entry for {', '.join(missing)}")
    for entry in catalog.models.values():
        if entry.weights and not entry.weights.startswith("builtin:"):
            path = Path(entry.weights).expanduser()
            entry.weights = str(path if path.is_absolute() else (base_dir / path).resolve())
    return catalog
