"""What the engines that run one pipeline call per request (FLUX.2, Fill) share: refusing oversized
inputs, the call itself with progress, cancellation and a seeded generator, and the result at the size the
request asked for.

They do not batch: each request is one call on its model, under the model's lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from fluxserve.core.params import GenerationParams
from fluxserve.engines.base import EngineHooks, EngineRequest, EngineResult, NamedImage
from fluxserve.engines.flux.adapters import noted
from fluxserve.engines.flux.loading import LoadedPipeline, short_reason
from fluxserve.engines.flux.preview import drawing
from fluxserve.errors import EngineError, JobCanceled

log = logging.getLogger("fluxserve.engines")


def refuse_oversized(request: EngineRequest, limit: int) -> None:
    """Refuse any input image above ``limit`` pixels (the catalog's ``max_input_pixels``) before any work."""
    named = [(each.field, each.image) for each in request.images]
    if request.image_prompt is not None:
        named.append(("image_prompt", request.image_prompt))
    for name, image in named:
        if image.width * image.height > limit:
            raise EngineError(
                f"{name}: {image.width}x{image.height} is {image.width * image.height} pixels; "
                f"{request.params.model} accepts at most {limit} pixels"
            )


def run_call(
    model: LoadedPipeline,
    request: EngineRequest,
    hooks: EngineHooks,
    arguments: dict[str, Any],
    previews: bool = False,
) -> Image.Image:
    """One pipeline call for ``request``: its prompt and seed, progress after each step (with a preview to
    offer where ``previews``: FLUX.1's packing of latents), JobCanceled at the next step once the job is
    canceled; a failing pipeline is an EngineError with the library's reason."""

    def on_step(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        draw = drawing(pipeline, tensors, 0, *size) if previews else None
        hooks.step((index + 1) / pipeline.num_timesteps, draw)
        return {}

    size = (arguments.get("width") or request.width, arguments.get("height") or request.height)

    generator = torch.Generator("cpu").manual_seed(request.seed)
    with model.lock:
        try:
            model.adapters.use(request.adapter)
            output = model.pipe(
                prompt=request.prompt, generator=generator, callback_on_step_end=on_step, **arguments
            )
        except (EngineError, JobCanceled):
            raise
        except Exception as exc:
            log.exception("pipeline failed", extra={"model": request.params.model})
            raise EngineError(f"{request.params.model}: generation failed: {short_reason(exc)}") from exc
    image: Image.Image = output.images[0].convert("RGB")
    return image


def result(image: Image.Image, request: EngineRequest, details: dict[str, Any]) -> EngineResult:
    """The engine's result at the requested size (LANCZOS when the pipeline ran at another size), its
    details noting the finetune it ran with."""
    if request.adapter is not None:
        details.update(noted(request.adapter))
    if image.size != (request.width, request.height):
        details["generated_size"] = f"{image.width}x{image.height}"
        image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
    return EngineResult(image=image, prompt=request.prompt, seed=request.seed, details=details)


class _Generates(Protocol):
    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult: ...


def warm_up(
    engine: _Generates,
    model: str,
    sizes: Sequence[tuple[int, int]],
    inputs: Callable[[int, int], Sequence[list[NamedImage]]],
) -> float:
    """Run ``model`` once, one step, at each size with each set of ``inputs(width, height)`` (the paths
    whose sequence lengths differ); returns the seconds taken. Compilation (one graph per sequence length)
    and first-call allocations happen here rather than in a client's job."""
    started = time.monotonic()
    for width, height in sizes:
        for images in inputs(width, height):
            params = GenerationParams(model=model, prompt="warm-up", steps=1)
            probe = EngineRequest(params, "warm-up", width=width, height=height, seed=0, images=images)
            engine.generate(probe, EngineHooks())
    return time.monotonic() - started
