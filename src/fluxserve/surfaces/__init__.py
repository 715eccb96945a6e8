"""The server's HTTP surfaces, one module each, and the one rule for which surface owns a request path.

A surface is one API this server speaks (``base.Surface``): the reseller's (``/bfl/v1``, ``/flux/*``), the
reseller's own format (``/flux/generate``, ``/flux/edits``), the vendor's (``/v1/<model>``, ``get_result``),
OpenAI's images API (``/v1/images/*``) and Replicate's predictions API (``/v1/predictions``, ``/v1/models/``,
``/v1/files``, ``/v1/webhooks/``). The routers (``api/``), the request guard, the error handlers,
the event streams and the webhook dispatcher all answer through the surface, never through a URL test of
their own.

**Which surface owns a path: the longest prefix wins.** Each surface lists its prefixes; ``/v1/images/``
(OpenAI's) is longer than ``/v1/`` (the vendor's), so ``/v1/images/edits`` is OpenAI's, ``/v1/predictions/x``
and ``/v1/models/black-forest-labs/flux-dev`` are Replicate's, while ``/v1/flux-dev``, ``/v1/get_result`` and
every other ``/v1/`` path, routed or not, are the vendor's; ``/flux/generate`` is the
reseller's own format and the rest of ``/flux/`` the reseller's. **A path no surface owns** (``/files/``,
``/healthz``, ``/playground/``, an unknown path) is answered in the reseller's envelope
(``{"status":"FAILED","message":...,"data":null}``), which such paths have always had.

A job remembers the surface it came in (``JobRecord.surface``), and :func:`of` gives that surface back: it
renders the job's webhook. Adding a surface is a module beside these, its name in
``core.models.SurfaceName``, and one line in :data:`SURFACES`.
"""

from __future__ import annotations

from typing import Any

from fluxserve.core.job import JobRecord
from fluxserve.core.models import SurfaceName
from fluxserve.surfaces.base import Links, Surface
from fluxserve.surfaces.openai import OPENAI
from fluxserve.surfaces.replicate import REPLICATE
from fluxserve.surfaces.reseller import RESELLER
from fluxserve.surfaces.reseller_native import RESELLER_NATIVE
from fluxserve.surfaces.vendor import VENDOR

__all__ = ["SUBMIT_PATHS", "SURFACES", "Links", "Surface", "for_path", "named", "of", "render"]

SURFACES: tuple[Surface, ...] = (
    RESELLER,
    RESELLER_NATIVE,
    VENDOR,
    OPENAI,
    REPLICATE,
)
UNOWNED = RESELLER  # answers the paths no surface owns

_BY_NAME: dict[SurfaceName, Surface] = {surface.name: surface for surface in SURFACES}
_BY_PREFIX = sorted(
    ((prefix, surface) for surface in SURFACES for prefix in surface.prefixes), key=lambda item: -len(item[0])
)
SUBMIT_PATHS = frozenset(path for surface in SURFACES for path in surface.submit_paths)


def owner(path: str) -> Surface | None:
    """The surface whose longest prefix starts ``path``; None when no surface owns it."""
    return next((surface for prefix, surface in _BY_PREFIX if path.startswith(prefix)), None)


def for_path(path: str) -> Surface:
    """The surface that answers a request for ``path``: its owner, else the one for unowned paths."""
    return owner(path) or UNOWNED


def named(name: SurfaceName) -> Surface:
    return _BY_NAME[name]


def of(job: JobRecord) -> Surface:
    """The surface the job came in."""
    return named(job.surface)


def render(job: JobRecord, links: Links) -> dict[str, Any]:
    """The job as the surface it came in renders it (a webhook's body)."""
    return of(job).render_job(job, links)
