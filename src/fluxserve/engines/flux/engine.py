"""The diffusers engine: one API model (a catalog entry) served by a :class:`FluxModel`.

A request is planned once (:meth:`DiffusersFluxEngine.plan`, see :mod:`~fluxserve.engines.flux.planning`
for the routes and their semantics); plans with one :meth:`~DiffusersFluxEngine.batch_key` run as one
pipeline call, and each gets the bytes it gets alone (see
:func:`~fluxserve.engines.flux.loading.batch_invariant`). The route taken is recorded as
``details["pipeline"]`` on every result, and an image generated under the catalog's ``max_pixels`` is
resized to the requested size with LANCZOS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fluxserve.core.catalog import ModelEntry
from fluxserve.core.models import Family, spec_of
from fluxserve.core.params import GenerationParams
from fluxserve.engines.base import EngineHooks, EngineRequest, EngineResult, NamedImage
from fluxserve.engines.flux.loading import FluxModel, short_reason
from fluxserve.engines.flux.options import FluxOptions
from fluxserve.engines.flux.planning import Plan, Planner
from fluxserve.engines.flux.preview import drawing
from fluxserve.engines.flux.regions import join
from fluxserve.errors import EngineError, JobCanceled

log = logging.getLogger("fluxserve.engines")


class DiffusersFluxEngine:
    """One API model (a catalog entry) served by a :class:`FluxModel`, possibly shared with other routes."""

    def __init__(self, weights: Path, entry: ModelEntry, model: FluxModel | None = None) -> None:
        self.entry = entry
        self.options = FluxOptions.of(entry)
        self.model = model or FluxModel(Path(weights), self.options.load())
        self.planner = Planner(entry, self.options, self.model)

    def warm_up(self, model: str) -> float:
        """Run each configured warm-up size once for ``model``, one step each; returns the seconds taken.

        Compilation (one graph per sequence length) and first-call allocations happen here rather than in
        a client's job. Kontext routes also warm the reference path, whose sequence is twice as long.
        """
        started = time.monotonic()
        for width, height in self.options.warmup:
            params = GenerationParams(model=model, prompt="warm-up", steps=1)
            probe = EngineRequest(params, prompt="warm-up", width=width, height=height, seed=0)
            self.generate(probe, EngineHooks())
            if spec_of(model).family is Family.KONTEXT:
                blank = NamedImage("input_image", Image.new("RGB", (width, height)))
                self.generate(replace(probe, images=[blank]), EngineHooks())
        return time.monotonic() - started

    @property
    def max_sequence_length(self) -> int:
        return self.planner.max_sequence_length

    @property
    def max_batch(self) -> int:
        """How many compatible plans a worker may hand to :meth:`generate_batch` at once."""
        return self.options.max_batch

    def plan(self, request: EngineRequest) -> Plan:
        """Everything decided about ``request`` before a pipeline runs; raises EngineError to refuse it."""
        return self.planner.plan(request)

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        """Plan and run one request alone."""
        result = self.generate_batch([self.plan(request)], [hooks])[0]
        if isinstance(result, JobCanceled):
            raise result
        return result

    def batch_key(self, plan: Plan) -> Hashable | None:
        """Plans with equal keys can share one pipeline call; None: this one runs alone.

        Text-to-image plans batch when their generation size, steps, guidance (schedule) and finetune (the
        same adapter at the same strength) agree; plans with images, or with several objects (one batch
        row each), do not.
        """
        if plan.pipe is not self.model.text2image or plan.kwargs or plan.prepare or len(plan.parts) > 1:
            return None
        params = plan.request.params
        return (plan.width, plan.height, plan.steps, plan.guidance, params.interval, plan.request.adapter)

    def generate_batch(
        self, plans: Sequence[Plan], hooks: Sequence[EngineHooks]
    ) -> list[EngineResult | JobCanceled]:
        """Run plans with one :meth:`batch_key` as one pipeline call; each keeps its own prompt and seed,
        and gets the image it would get alone. A plan is not changed by running it.

        A canceled request gets JobCanceled in its place while the others go on; when every request is
        canceled the call stops at the next step. A plan of several objects is one call of one row per
        object, from the request's seed each, joined after the last step (engines/flux/regions.py).
        """
        requests = [each.request for each in plans]
        keys = {self.batch_key(each) for each in plans}
        if len(plans) > 1 and (len(keys) != 1 or None in keys):
            raise ValueError("generate_batch: these requests cannot share a pipeline call (see batch_key)")
        plan = plans[0]
        canceled = [False] * len(plans)
        joined = len(plan.parts) > 1
        rows = (
            [(part.prompt, plan.request.seed) for part in plan.parts]
            if joined
            else [(each.prompt, each.request.seed) for each in plans]
        )

        centres = [part.centre for part in plan.parts]

        def on_step(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if joined:  # previews show the joined scene; the pipeline decodes it after the last step
                tensors = {"latents": join(tensors["latents"], centres, plan.width, plan.height)}
            for position, hook in enumerate(hooks):
                if not canceled[position]:
                    try:
                        draw = drawing(pipeline, tensors, position, plan.width, plan.height)
                        hook.step((index + 1) / pipeline.num_timesteps, draw)
                    except JobCanceled:
                        canceled[position] = True
            if all(canceled):
                raise JobCanceled()
            return tensors if joined and index + 1 == pipeline.num_timesteps else {}

        arguments = {
            "prompt": [prompt for prompt, _ in rows],
            "width": plan.width,
            "height": plan.height,
            "num_inference_steps": plan.steps,
            "guidance_scale": plan.guidance,
            "generator": [torch.Generator("cpu").manual_seed(seed) for _, seed in rows],
            "max_sequence_length": self.max_sequence_length,
            "callback_on_step_end": on_step,
            **plan.kwargs,
        }
        if "true_cfg_scale" in plan.details:
            arguments |= {
                "true_cfg_scale": plan.details["true_cfg_scale"],
                "negative_prompt": [""] * len(rows),
            }
        with self.model.lock, self.model.guidance_schedule(plan.schedule) as used:
            try:
                finetune = self.model.adapters.use(plan.request.adapter)
                if plan.prepare is not None:
                    arguments.update(plan.prepare())
                output = plan.pipe(**arguments)
            except JobCanceled:
                return [JobCanceled() for _ in requests]
            except EngineError:
                raise
            except Exception as exc:
                log.exception("pipeline failed", extra={"model": requests[0].params.model})
                raise EngineError(
                    f"{requests[0].params.model}: generation failed: {short_reason(exc)}"
                ) from exc
        results: list[EngineResult | JobCanceled] = []
        images = output.images[: len(requests)]  # a joined scene is on every row
        for request, planned, image, stopped in zip(requests, plans, images, canceled, strict=True):
            if stopped:
                results.append(JobCanceled())
                continue
            details = {**planned.details, **finetune}
            if plan.schedule is not None:
                details["guidance_per_step"] = list(used)
            if len(requests) > 1:
                details["batch"] = len(requests)
            image = image.convert("RGB")
            if image.size != (request.width, request.height):
                image = image.resize((request.width, request.height), Image.Resampling.LANCZOS)
            results.append(
                EngineResult(image=image, prompt=request.prompt, seed=request.seed, details=details)
            )
        return results
