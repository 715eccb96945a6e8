"""Fill and expand on local weights: ``FluxFillPipeline`` (FLUX.1 Fill [dev] or a folder like it).

- Fill repaints the white part of ``mask`` (or, without a mask, the transparent part of ``image``) and
  keeps the rest: the request's :meth:`~fluxserve.engines.base.EngineRequest.repaint_mask`.
- Expand grows ``image`` by its ``top``/``bottom``/``left``/``right`` margins: the image sits on a larger
  canvas and the mask covers the new area, then the same pipeline paints it.

Kept pixels are the input's own: the painted image is composited over the canvas with the mask, so what
the mask keeps comes back unchanged whatever the model did there. The output has the request's size (the
size rule made it the image's, or the image's plus the margins), generated within the catalog's
``max_pixels`` in multiples of 16 and resized to it. Steps and guidance: the request's, else the
catalog's, else FLUX.1 Fill [dev]'s reference settings (50 steps, guidance 30).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from diffusers import DiffusionPipeline, FluxFillPipeline
from PIL import Image

from fluxserve.core.catalog import ModelEntry
from fluxserve.core.models import Family
from fluxserve.engines.base import EngineHooks, EngineRequest, EngineResult, NamedImage
from fluxserve.engines.flux.loading import LoadedPipeline, text_length
from fluxserve.engines.flux.options import FluxOptions, LoadOptions
from fluxserve.engines.flux.planning import generation_size
from fluxserve.engines.flux.single import refuse_oversized, result, run_call, warm_up
from fluxserve.errors import EngineError

FILL_STEPS = 50
FILL_GUIDANCE = 30.0


class FillModel(LoadedPipeline):
    """FLUX.1 Fill weights in memory: a FluxFillPipeline folder."""

    PIPELINES: ClassVar[Mapping[str, type[DiffusionPipeline]]] = {"FluxFillPipeline": FluxFillPipeline}
    QUANTIZED = ("transformer", "text_encoder_2")

    def __init__(self, weights: Path, options: LoadOptions | None = None) -> None:
        super().__init__(weights, options)
        self.max_sequence_length = text_length(self.pipe.tokenizer_2)


def canvas_and_mask(request: EngineRequest) -> tuple[Image.Image, Image.Image]:
    """The picture the pipeline works on and where it paints (``L``, 255 paint, 0 keep), at the request's
    size: fill's image and its repaint mask, or expand's image on a canvas grown by the margins."""
    source = request.source
    if source is None:
        raise EngineError("image: is required")
    if request.spec.family is Family.EXPAND:
        left, top, right, bottom = request.margins
        size = (source.width + left + right, source.height + top + bottom)
        canvas = Image.new("RGB", size)
        canvas.paste(source.convert("RGB"), (left, top))
        mask = Image.new("L", size, 255)
        mask.paste(0, (left, top, left + source.width, top + source.height))
    else:
        canvas, mask = source.convert("RGB"), request.repaint_mask()
    wanted = (request.width, request.height)
    if canvas.size != wanted:
        canvas = canvas.resize(wanted, Image.Resampling.LANCZOS)
        mask = mask.resize(wanted, Image.Resampling.NEAREST)
    return canvas, mask


class FillEngine:
    """One fill or expand API model (a catalog entry) served by a :class:`FillModel`, possibly shared."""

    def __init__(self, weights: Path, entry: ModelEntry, model: FillModel | None = None) -> None:
        self.entry = entry
        self.options = FluxOptions.of(entry).single_pipeline("fill and expand")
        self.model = model or FillModel(Path(weights), self.options.load())

    def warm_up(self, model: str) -> float:
        """One step at each ``options.warmup`` size (the output's); the seconds taken."""

        def inputs(width: int, height: int) -> list[list[NamedImage]]:
            image, mask = Image.new("RGB", (width, height)), Image.new("L", (width, height), 255)
            return [[NamedImage("image", image), NamedImage("mask", mask)]]

        return warm_up(self, model, self.options.warmup, inputs)

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        refuse_oversized(request, self.entry.max_input_pixels)
        canvas, mask = canvas_and_mask(request)
        steps = request.params.steps_for(self.entry.steps, FILL_STEPS)
        guidance = request.params.guidance_for(self.entry.guidance, FILL_GUIDANCE)
        width, height = generation_size(
            request.width,
            request.height,
            self.entry.max_pixels,
            self.model.multiple,
            self.options.native_size,
        )
        size = (width, height)
        arguments = {
            "image": canvas.resize(size, Image.Resampling.LANCZOS) if canvas.size != size else canvas,
            "mask_image": mask.resize(size, Image.Resampling.NEAREST) if mask.size != size else mask,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "max_sequence_length": self.options.max_sequence_length or self.model.max_sequence_length,
        }
        painted = result(run_call(self.model, request, hooks, arguments, previews=True), request, {})
        details: dict[str, Any] = {
            "pipeline": "expand" if request.spec.family is Family.EXPAND else "fill",
            "steps": steps,
            "guidance": guidance,
            **painted.details,
        }
        painted.image = Image.composite(painted.image, canvas, mask)
        painted.details = details
        return painted
