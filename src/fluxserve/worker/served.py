"""The models a worker process serves (``fluxserve worker --models a,b``), read and checked against the
catalog before the worker imports torch, so that a typo stops the start at once rather than leaving a
worker that never claims a job."""

from __future__ import annotations

from fluxserve.core.catalog import load_catalog
from fluxserve.settings import Settings


def served_models(value: str | None, settings: Settings) -> list[str] | None:
    """The names in ``value`` (comma-separated), or None (every model) when it is None; ValueError names
    what is wrong: no name at all, or names the catalog lacks."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError("name at least one model")
    unknown = sorted(set(names) - set(load_catalog(settings.catalog_files).models))
    if unknown:
        raise ValueError(f"not in the catalog: {', '.join(unknown)}")
    return names
