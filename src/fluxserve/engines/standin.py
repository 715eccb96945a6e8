"""FLUX.1 weights standing in for the FLUX.2 and FLUX.1 Fill routes, so that every route answers out of the
box (the shipped catalog serves them with the bundled model until the operator names FLUX.2 or Fill
weights, which the registry then serves with their own engines).

- FLUX.2 ([pro], [max], [flex], [klein]): with references, as a kontext request (the references side by
  side as the conditioning image, :mod:`~fluxserve.engines.flux.planning`); without, as text to image.
- fill: text to image at the image's size, then only the masked area is taken from it; every other
  pixel is the input image's.
- expand: text to image at the grown size, then the input image is pasted back unchanged at
  (left, top): only the new margins are painted.

The request is handed to the FLUX.1 engine under the name of a FLUX.1 route with the same inputs
(:data:`AS_ROUTE`); the result's details say so (``stand_in``).
"""

from __future__ import annotations

from dataclasses import replace

from PIL import Image

from fluxserve.core.models import Family
from fluxserve.engines.base import Engine, EngineHooks, EngineRequest, EngineResult, NamedImage
from fluxserve.errors import EngineError

# The FLUX.1 route a stand-in request runs as: kontext takes references, flux-pro-1.1 is plain text to
# image at the request's size (the catalog entry of the route asked for still sets steps and options).
WITH_REFERENCES = "flux-kontext-pro"
TEXT_TO_IMAGE = "flux-pro-1.1"
FAMILIES = frozenset({Family.FLUX2, Family.FLUX2_KLEIN, Family.FILL, Family.EXPAND})


class StandInEngine:
    """Serves the FLUX.2, fill and expand routes on a FLUX.1 engine (``base``); one per route."""

    def __init__(self, base: Engine) -> None:
        self.base = base

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        family = request.spec.family
        if family in (Family.FLUX2, Family.FLUX2_KLEIN):
            route = WITH_REFERENCES if request.references else TEXT_TO_IMAGE
            return self._run(request, route, request.references, hooks)
        if family not in FAMILIES:
            return self.base.generate(request, hooks)
        if request.source is None:
            raise EngineError("image: is required")
        source = request.source.convert("RGB")
        if family is Family.FILL:
            mask = request.repaint_mask()
            painted = self._run(request, TEXT_TO_IMAGE, [], hooks)
            image = Image.composite(painted.image.convert("RGB"), source, mask)
            return replace(painted, image=image, details={**painted.details, "kept": "unmasked"})
        painted = self._run(request, TEXT_TO_IMAGE, [], hooks)  # expand
        image = painted.image.convert("RGB")
        left, top, _, _ = request.margins
        image.paste(source, (left, top))
        return replace(painted, image=image, details={**painted.details, "kept": "original"})

    def _run(
        self, request: EngineRequest, route: str, images: list[NamedImage], hooks: EngineHooks
    ) -> EngineResult:
        params = request.params.model_copy(update={"model": route, "input_images": []})
        result = self.base.generate(replace(request, params=params, images=images), hooks)
        return replace(result, details={**result.details, "stand_in": route})
