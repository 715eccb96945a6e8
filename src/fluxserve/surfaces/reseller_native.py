"""The reseller's own format: ``POST /flux/generate`` (JSON) and ``POST /flux/edits`` (multipart), with
``mode`` naming the model. Its answers are the reseller's (the same envelope, fetch JSON and webhook); its
jobs remember that they came in here."""

from __future__ import annotations

from fluxserve.core.models import SurfaceName
from fluxserve.surfaces.reseller import ResellerSurface


class ResellerNativeSurface(ResellerSurface):
    name = SurfaceName.RESELLER_NATIVE
    prefixes = ("/flux/generate", "/flux/edits")
    submit_paths = frozenset(prefixes)


RESELLER_NATIVE = ResellerNativeSurface()
