"""Everything about a request that is decided before a pipeline runs: a :class:`Plan`.

:class:`Planner` refuses bad inputs, settles steps, guidance and the generation size, and routes the request
to a pipeline. A request is planned once; the engine batches and runs plans.

Routing (recorded as ``details["pipeline"]`` on every result):

- ``text2image``: FluxPipeline. flux-dev, flux-pro, flux-pro-1.1, flux-pro-1.1-ultra, and kontext routes
  sent without an input image. A model folder with a ``phrasing.json`` (the bundled model) reads the prompt
  in its own phrasing (:mod:`~fluxserve.engines.phrasing`; ``details["read_as"]``); a scene of several
  objects is drawn one object at a time and joined (:mod:`~fluxserve.engines.flux.regions`).
- ``kontext``: FluxKontextPipeline, for kontext routes with ``input_image``. ``input_image_2..4`` are
  stitched beside it into one conditioning canvas (the pipeline takes one image). The canvas is sized to
  the generation's pixel budget (same aspects, multiples of 16) and the pipeline is told ``max_area`` and
  not to auto-resize: left alone it would work at ~1 MP whatever the model, minutes on a small one.
- ``redux``: for ``image_prompt`` when the catalog names a FLUX Redux prior (``options.redux``): the
  image's Redux tokens are appended to the prompt's T5 tokens and FluxPipeline runs on them.
  ``image_prompt_strength`` s cross-fades the two: text tokens (and CLIP's pooled vector) are weighted
  min(1, 2(1 - s)), image tokens min(1, 2s). s = 0.5 is stock Redux (both at full weight); s = 1 drops
  the prompt entirely (image only).
- ``img2img``: FluxImg2ImgPipeline, for ``image_prompt`` without a Redux prior. s becomes the diffusers
  denoising strength 1 - s; at s = 1 a single denoising step at the lowest noise level runs, which keeps
  the image prompt.

  On both paths s = 0 means prompt only: the image is ignored and plain text-to-image runs (same bytes as
  without an image prompt). flux-pro, flux-pro-1.1 and flux-dev have no strength field: they use the
  catalog option ``image_prompt_strength``, by default 0.5 with Redux (stock Redux) and 0.25 with img2img
  (the image keeps its layout and colours and the prompt redraws the rest).

Guidance: flux-pro's ``interval`` i (1..4) is a guidance schedule over noise levels: the requested
guidance applies while the noise level (sigma, 1 at the start, 0 at the end) is at least 1 - i/4, and the
remaining, low-noise steps run at guidance 1.0. So i = 4 is constant guidance, i = 2 (the default) guides
the noisier half of the trajectory where the composition forms and leaves the fine detail free, i = 1
only the first quarter. The values used per step are recorded as ``details["guidance_per_step"]``. On a
model without a guidance input (FLUX.1-schnell-like), ``details["interval"]`` says it was unused.
flux-pro-1.1-ultra's ``raw`` caps guidance at the catalog option ``raw_guidance`` (default 2.0): lower
distilled guidance gives the less saturated, more natural look that raw mode stands for. The catalog option
``true_cfg_scale`` (above 1) adds true classifier-free guidance against the empty prompt on every path but
Redux, for models trained with caption dropout, such as the bundled one (recorded in ``details``).

Sizes: when the catalog's ``max_pixels`` is below the requested area, the image is generated at the
largest same-aspect size within it (multiples of 16) and resized to the requested size with LANCZOS. The
option ``native_size`` (a model trained at one square size) generates every image at that square instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageOps

from fluxserve.core.catalog import ModelEntry
from fluxserve.core.models import Family
from fluxserve.core.notes import READ_AS
from fluxserve.engines.base import EngineRequest
from fluxserve.engines.flux.loading import FluxModel
from fluxserve.engines.flux.options import FluxOptions
from fluxserve.engines.flux.single import refuse_oversized
from fluxserve.engines.phrasing import READER_WORDS, Part, read_prompt, said
from fluxserve.engines.vocabulary import vocabulary_note
from fluxserve.errors import EngineError

DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
UNGUIDED = 1.0  # the distilled guidance value that adds no guidance


def interval_schedule(guidance: float, interval: float) -> Callable[[float], float]:
    """flux-pro's ``interval``: full guidance while sigma >= 1 - interval/4, no extra guidance after."""
    threshold = 1.0 - interval / 4.0

    def at(sigma: float) -> float:
        return guidance if sigma >= threshold - 1e-6 else UNGUIDED

    return at


def generation_size(
    width: int, height: int, max_pixels: int | None, multiple: int = 16, native: int | None = None
) -> tuple[int, int]:
    """The size to denoise at: the request's, or the largest same-aspect size within ``max_pixels``, or
    the ``native`` square of a model that knows no other size.

    Both sides are multiples of ``multiple`` (the VAE's 8x times FLUX's 2x2 packing). Under a budget, the
    short side steps through the multiples and the long side takes the multiple nearest the requested
    aspect (off by at most half a multiple); the largest pair that fits wins. The image is resized to the
    request afterwards.
    """

    def snap(value: float) -> int:
        return max(multiple, round(value / multiple) * multiple)

    if native:
        return native, native
    if not max_pixels or max_pixels <= 0 or width * height <= max_pixels:
        return snap(width), snap(height)
    ratio = max(width, height) / min(width, height)
    best = (multiple, multiple)
    for short in range(multiple, math.isqrt(max_pixels) + 1, multiple):
        long = snap(short * ratio)
        if short * long <= max_pixels and short * long > best[0] * best[1]:
            best = (short, long)
    return best[::-1] if width >= height else best


def reference_canvas(images: list[Image.Image], area: int, multiple: int = 16) -> Image.Image:
    """The kontext conditioning image: the references side by side, in order, at one common height.

    FluxKontextPipeline conditions on a single image, so ``input_image_2..4`` are stitched beside
    ``input_image`` rather than dropped. The canvas keeps the references' aspect ratios and has about
    ``area`` pixels (the generation's budget, shared by the references), sides multiples of ``multiple``.
    """
    ratios = [image.width / image.height for image in images]
    height = max(multiple, math.floor(math.sqrt(area / sum(ratios)) / multiple) * multiple)
    width = max(multiple, math.floor(height * sum(ratios) / multiple) * multiple)
    canvas = Image.new("RGB", (width, height))
    left, cumulative = 0, 0.0
    for image, ratio in zip(images, ratios, strict=True):
        cumulative += ratio
        right = round(width * cumulative / sum(ratios))
        if right > left:
            tile = image.convert("RGB").resize((right - left, height), Image.Resampling.LANCZOS)
            canvas.paste(tile, (left, 0))
        left = right
    return canvas


@dataclass
class Plan:
    """A planned request: the pipeline to call and what to call it with, decided once."""

    request: EngineRequest
    pipe: Any
    kwargs: dict[str, Any]
    width: int
    height: int
    steps: int
    guidance: float
    schedule: Callable[[float], float] | None
    details: dict[str, Any]
    prompt: str  # what the pipeline reads: the request's prompt, or the model's own phrasing (of each part)
    prepare: Callable[[], dict[str, Any]] | None = None  # more arguments, computed under the model lock
    parts: tuple[Part, ...] = ()  # the reader's objects; several are drawn apart and joined (regions.py)


class Planner:
    """Plans the requests of one API model (a catalog entry) on a :class:`FluxModel`."""

    def __init__(self, entry: ModelEntry, options: FluxOptions, model: FluxModel) -> None:
        self.entry = entry
        self.options = options
        self.model = model

    @property
    def max_sequence_length(self) -> int:
        return self.options.max_sequence_length or self.model.max_sequence_length

    def plan(self, request: EngineRequest) -> Plan:
        """Everything about a request that is decided before the pipeline runs; refuses bad inputs."""
        self._check_inputs(request)
        steps = request.params.steps_for(self.entry.steps, DEFAULT_STEPS)
        guidance = request.params.guidance_for(self.entry.guidance, DEFAULT_GUIDANCE)
        width, height = generation_size(
            request.width,
            request.height,
            self.entry.max_pixels,
            self.model.multiple,
            self.options.native_size,
        )
        details: dict[str, Any] = {"steps": steps}
        if request.params.raw:
            guidance = min(guidance, self.options.raw_guidance)
            details["raw"] = True
        details["guidance"] = guidance
        schedule = None
        if request.params.interval is not None:
            if self.model.takes_guidance:
                schedule = interval_schedule(guidance, request.params.interval)
                details["interval"] = request.params.interval
            else:
                details["interval"] = "unused: this model takes no guidance input"
        if (width, height) != (request.width, request.height):
            details["generated_size"] = f"{width}x{height}"
        pipe = self.model.text2image
        plan = Plan(request, pipe, {}, width, height, steps, guidance, schedule, details, request.prompt)
        self._route(request, plan)
        # the words that joined a scene's objects were understood by the reader, whatever the model knows
        understood = READER_WORDS if len(plan.parts) > 1 else frozenset()
        details.update(vocabulary_note(self.model.weights, request.prompt, understood))
        if self.options.true_cfg_scale > 1 and plan.prepare is None:
            details["true_cfg_scale"] = self.options.true_cfg_scale
        return plan

    def _check_inputs(self, request: EngineRequest) -> None:
        """Refuse oversized inputs, and inputs the route has no use for, before any work."""
        refuse_oversized(request, self.entry.max_input_pixels)
        if request.images and request.spec.family is not Family.KONTEXT:
            raise EngineError(f"input_image: {request.params.model} does not take input images")

    def _route(self, request: EngineRequest, plan: Plan) -> None:
        """Pick the pipeline for the request and its path-specific arguments; note the choice in details."""
        details = plan.details
        if request.images:
            area = plan.width * plan.height
            reference = reference_canvas([named.image for named in request.images], area, self.model.multiple)
            details.update(pipeline="kontext", references=len(request.images))
            plan.pipe = self.model.kontext
            plan.kwargs = {"image": reference, "max_area": area, "_auto_resize": False}
            return
        if request.image_prompt is not None:
            redux = self.model.redux is not None
            strength = request.params.image_prompt_strength
            if strength is None:
                strength = self.options.image_prompt_strength
            if strength is None:
                strength = 0.5 if redux else 0.25
            details["image_prompt_strength"] = strength
            if strength > 0 and redux:
                details["pipeline"] = "redux"
                image = request.image_prompt.convert("RGB")
                plan.prepare = lambda: self._redux_embeddings(request.prompt, image, strength)
                return
            if strength > 0:
                # At least one denoising step: diffusers runs int(steps * denoise) of them.
                denoise = max(1.0 - strength, 1.0 / plan.steps)
                size = (plan.width, plan.height)
                image = ImageOps.fit(request.image_prompt.convert("RGB"), size, Image.Resampling.LANCZOS)
                details.update(pipeline="img2img", denoise=round(denoise, 4))
                plan.pipe = self.model.img2img
                plan.kwargs = {"image": image, "strength": denoise}
                return
        details["pipeline"] = "text2image"
        parts = read_prompt(self.model.weights, request.prompt)
        if parts is None:
            return
        plan.parts = parts
        if len(parts) > 1:
            details["objects"] = len(parts)
        read = said(parts)
        if read != request.prompt:  # noted only when it says something new
            plan.prompt = details[READ_AS] = read

    @torch.no_grad()
    def _redux_embeddings(self, prompt: str, image: Image.Image, strength: float) -> dict[str, Any]:
        """The prompt's T5 tokens and the image's Redux tokens, cross-faded by ``strength``."""
        redux, pipe = self.model.redux, self.model.text2image
        assert redux is not None
        device = pipe._execution_device
        text, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        tokens = redux.image_embedder(redux.encode_image(image, device, 1)).image_embeds.to(text.dtype)
        text_weight, image_weight = min(1.0, 2 * (1 - strength)), min(1.0, 2 * strength)
        return {
            "prompt": None,
            "prompt_embeds": torch.cat([text * text_weight, tokens * image_weight], dim=1),
            "pooled_prompt_embeds": pooled * text_weight,
        }
