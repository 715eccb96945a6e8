"""FLUX.2 on local weights: ``Flux2Pipeline`` ([dev]) or ``Flux2KleinPipeline`` ([klein]), whichever the
weights folder holds, for text to image and multi-reference editing.

Semantics:

- References are the request's ``input_image`` .. ``input_image_8`` in field order, then ``image_prompt``
  (the reseller's FLUX.2 routes keep FLUX.1's field set: an image prompt is one more reference), passed as
  the pipeline's list of images (each gets its own position offset in the sequence). Each is scaled, aspect
  kept, to at most the generation's pixel count and at least 64 pixels a side (the pipeline's minimum);
  left alone the pipeline would encode every reference at up to 1 MP whatever the output size. A reference
  more elongated than 8:1 is refused (the pipeline's limit), naming its field.
- Steps and guidance: the request's, else the catalog entry's, else the weights' reference settings
  (:func:`defaults`): [dev] 50 steps at embedded guidance 4; [klein] base 50 steps with true CFG at 4;
  step-distilled [klein] 4 steps, where guidance is unused (``details["guidance"]`` says so).
- Size: the request's (the model table's size rule resolved it), generated within the catalog's
  ``max_pixels`` and resized to it as on FLUX.1 routes.

The loading knobs of FLUX.1 apply (device, dtype, quantization of the transformer and the text encoder,
CPU offload, attention backend, VAE tiling, compilation); the FLUX.1-only ones are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Pipeline
from PIL import Image

from fluxserve.core.catalog import ModelEntry
from fluxserve.engines.base import EngineHooks, EngineRequest, EngineResult, NamedImage
from fluxserve.engines.flux.loading import LoadedPipeline, text_length
from fluxserve.engines.flux.options import FluxOptions, LoadOptions
from fluxserve.engines.flux.planning import generation_size
from fluxserve.engines.flux.single import refuse_oversized, result, run_call, warm_up
from fluxserve.errors import EngineError

MIN_REFERENCE_SIDE = 64  # Flux2ImageProcessor.check_image_input's minimum
MAX_REFERENCE_RATIO = 8  # and its most elongated aspect


class Flux2Model(LoadedPipeline):
    """FLUX.2 weights in memory: a Flux2Pipeline or Flux2KleinPipeline folder."""

    PIPELINES: ClassVar[Mapping[str, type[DiffusionPipeline]]] = {
        "Flux2Pipeline": Flux2Pipeline,
        "Flux2KleinPipeline": Flux2KleinPipeline,
    }
    QUANTIZED = ("transformer", "text_encoder")

    def __init__(self, weights: Path, options: LoadOptions | None = None) -> None:
        super().__init__(weights, options)
        tokenizer = self.pipe.tokenizer  # [dev]'s is a processor wrapping the tokenizer
        self.max_sequence_length = text_length(getattr(tokenizer, "tokenizer", tokenizer))

    @property
    def distilled(self) -> bool:
        """A step-distilled [klein]: few steps, and guidance has no input to go to."""
        return bool(self.pipe.config.get("is_distilled", False))


def defaults(model: Flux2Model) -> tuple[int, float]:
    """Steps and guidance when neither the request nor the catalog says: the weights' reference settings."""
    return (4, 1.0) if model.distilled else (50, 4.0)


def fit_reference(named: NamedImage, area: int) -> Image.Image:
    """A reference scaled (aspect kept) to at most ``area`` pixels and at least 64 a side."""
    image = named.image.convert("RGB")
    width, height = image.size
    if max(width / height, height / width) > MAX_REFERENCE_RATIO:
        raise EngineError(
            f"{named.field}: {width}x{height} is more elongated than {MAX_REFERENCE_RATIO}:1, "
            "the most a FLUX.2 reference may be"
        )
    scale = min(1.0, math.sqrt(area / (width * height)))
    scale = max(scale, MIN_REFERENCE_SIDE / min(width, height))
    size = (max(MIN_REFERENCE_SIDE, round(width * scale)), max(MIN_REFERENCE_SIDE, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


class Flux2Engine:
    """One FLUX.2 API model (a catalog entry) served by a :class:`Flux2Model`, possibly shared."""

    def __init__(self, weights: Path, entry: ModelEntry, model: Flux2Model | None = None) -> None:
        self.entry = entry
        self.options = FluxOptions.of(entry).single_pipeline("FLUX.2")
        self.model = model or Flux2Model(Path(weights), self.options.load())

    def warm_up(self, model: str) -> float:
        """One step at each ``options.warmup`` size, without and with a reference; the seconds taken."""

        def inputs(width: int, height: int) -> list[list[NamedImage]]:
            return [[], [NamedImage("input_image", Image.new("RGB", (width, height)))]]

        return warm_up(self, model, self.options.warmup, inputs)

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        refuse_oversized(request, self.entry.max_input_pixels)
        named = list(request.references)
        if request.image_prompt is not None:
            named.append(NamedImage("image_prompt", request.image_prompt))
        default_steps, default_guidance = defaults(self.model)
        steps = request.params.steps_for(self.entry.steps, default_steps)
        guidance = request.params.guidance_for(self.entry.guidance, default_guidance)
        width, height = generation_size(
            request.width,
            request.height,
            self.entry.max_pixels,
            self.model.multiple,
            self.options.native_size,
        )
        references = [fit_reference(each, width * height) for each in named]
        details: dict[str, Any] = {
            "pipeline": self.model.kind,
            "steps": steps,
            "guidance": "unused: step-distilled model" if self.model.distilled else guidance,
        }
        if references:
            details["references"] = len(references)
        arguments = {
            "image": references or None,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": 1.0 if self.model.distilled else guidance,
            "max_sequence_length": self.options.max_sequence_length or self.model.max_sequence_length,
        }
        return result(run_call(self.model, request, hooks, arguments), request, details)
