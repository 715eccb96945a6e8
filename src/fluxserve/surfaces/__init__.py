"""How each dialect shows a job to its clients, below the routers (``api/``) and the webhook dispatcher,
which both render through here: the reseller's fetch JSON and the vendor's ``get_result`` shape.

What a rendering needs from outside the job row (a signed result URL, the queue position) is passed in as
:class:`~fluxserve.surfaces.base.Links`, so that nothing here imports a router or a store.
"""

from __future__ import annotations

from typing import Any

from fluxserve.core.job import Job
from fluxserve.core.models import SurfaceName
from fluxserve.surfaces import reseller, vendor
from fluxserve.surfaces.base import Links

__all__ = ["Links", "render"]


def render(job: Job, links: Links) -> dict[str, Any]:
    """The job as its own dialect renders it (a webhook's body): the vendor's result, else the fetch JSON."""
    if job.dialect is SurfaceName.VENDOR:
        return vendor.render_json(job, links)
    return reseller.render_job(job, links)
