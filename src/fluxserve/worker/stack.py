"""Whether this install can run a worker's models: the local engines need the ``local`` extra (torch,
diffusers, transformers...), which an API replica or a client machine does not install; the relay engine
needs none of it.

Checked before anything imports the model stack, so that a worker started without it says in one line what
to install instead of dying in a traceback, and ``serve`` refuses to start workers that would.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection

from fluxserve.core.catalog import Catalog
from fluxserve.safety.moderation import CLASSIFIER_MODULES, parse_setting
from fluxserve.settings import Settings

# The top-level modules of the ``local`` extra's packages (pyproject.toml), as they are imported; the
# moderation classifiers' (safety.moderation.CLASSIFIER_MODULES) unless moderation is off.
LOCAL_MODULES = ("torch", "diffusers", "transformers", "accelerate", "sentencepiece", "tokenizers")
INSTALL_LOCAL = "pip install 'fluxserve[local]'"


def missing_local_modules(moderation: bool = True) -> list[str]:
    """The modules of the ``local`` extra that cannot be imported here; found without importing them."""
    missing = []
    for name in LOCAL_MODULES + (CLASSIFIER_MODULES if moderation else ()):
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # an import hook that refuses the name
            found = False
        if not found:
            missing.append(name)
    return missing


def runs_local_models(catalog: Catalog, models: Collection[str] | None) -> bool:
    """Whether a worker serving ``models`` (None: the whole catalog) runs any of them on a local engine."""
    served = catalog.models.values() if models is None else [catalog.models[name] for name in models]
    return any(entry.engine != "relay" for entry in served)


def local_stack_problem(catalog: Catalog, models: Collection[str] | None, moderation: bool) -> str | None:
    """Why a worker serving ``models`` (and moderating its local jobs, with ``moderation``) cannot run
    here, and what to install, in one line; None when it can."""
    if not runs_local_models(catalog, models):
        return None
    missing = missing_local_modules(moderation)
    if not missing:
        return None
    return (
        f"the worker's models run on local engines, which need {', '.join(missing)} (not installed): "
        f"{INSTALL_LOCAL}"
    )


def moderates(settings: Settings) -> bool:
    """Whether local jobs are moderated here (``FLUXSERVE_MODERATION`` is not ``off``)."""
    return parse_setting(settings.moderation) is not None
