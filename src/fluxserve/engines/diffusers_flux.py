"""The ``diffusers`` engine: FLUX pipelines on local weights, one route's semantics at a time.

Routing (recorded as ``details["pipeline"]`` on every result):

- ``text2image``: FluxPipeline. flux-dev, flux-pro, flux-pro-1.1, flux-pro-1.1-ultra, and kontext routes
  sent without an input image.
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
largest same-aspect size within it (multiples of 16) and resized to the requested size with LANCZOS.

The weights are loaded once (``from_pretrained``) and the other pipelines are derived with ``from_pipe``,
which shares every module: one copy of the weights serves all three paths.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import FluxImg2ImgPipeline, FluxKontextPipeline, FluxPipeline, FluxPriorReduxPipeline
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fluxserve.core.catalog import ModelEntry
from fluxserve.core.models import Family, spec_of
from fluxserve.core.params import GenerationParams
from fluxserve.engines.base import EngineHooks, EngineRequest, EngineResult, NamedImage
from fluxserve.errors import EngineError, JobCanceled

log = logging.getLogger("fluxserve.engines")

DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
MAX_SEQUENCE_LENGTH = 512  # FLUX.1's T5 context; a checkpoint whose tokenizer is shorter uses its own
UNGUIDED = 1.0  # the distilled guidance value that adds no guidance


class LoadOptions(BaseModel):
    """How the weights are loaded and run. Routes share one loaded model only when these agree."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field(default="auto", description="auto: cuda when there is one, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bfloat16 on cuda, float32 elsewhere (CPUs are slow at bf16)."
    )
    attention: str | None = Field(
        default=None, description="A diffusers attention backend (native, flash, sage, ...); None: native."
    )
    vae_tiling: bool = Field(default=False, description="Decode in tiles: large images on small GPUs.")
    cpu_offload: bool = Field(
        default=False, description="Keep modules on the CPU and move each to the device while it runs."
    )
    quantize: Literal["int8", "fp8"] | None = Field(
        default=None,
        description="Weight-only quantization of the transformer and T5 with torchao: int8 halves bf16 "
        "weights and runs anywhere; fp8 needs a GPU with fp8 support to be fast (runs, slowly, on CPU).",
    )
    redux: str | None = Field(
        default=None,
        description="Folder of a FLUX Redux prior (FluxPriorReduxPipeline) for image_prompt; "
        "builtin:tiny-redux for the tiny one. None: image_prompt runs img2img.",
    )
    compile: bool = Field(default=False, description="torch.compile the transformer's forward.")
    compile_backend: str = Field(default="inductor", description="torch.compile backend.")
    compile_mode: str | None = Field(default=None, description="torch.compile mode, e.g. max-autotune.")


class FluxOptions(LoadOptions):
    """The diffusers engine's knobs, from the catalog entry's ``options`` table. Unknown keys are refused."""

    image_prompt_strength: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Strength for image_prompt on routes without the field (flux-pro, -1.1, -dev); "
        "default 0.5 with a Redux prior, 0.25 with img2img.",
    )
    raw_guidance: float = Field(default=2.0, gt=0, description="Highest guidance in ultra's raw mode.")
    true_cfg_scale: float = Field(
        default=1.0,
        ge=1,
        description="True classifier-free guidance against the empty prompt, for models trained with "
        "caption dropout (the bundled one, de-distilled FLUX); 1: off. Each step runs the transformer twice. "
        "Not applied to Redux image prompts.",
    )
    max_sequence_length: int | None = Field(
        default=None, gt=0, description="T5 tokens; default the tokenizer's length, at most 512."
    )
    max_batch: int = Field(
        default=1, ge=1, description="Most text-to-image jobs of one size and steps run as one batch."
    )
    warmup: list[tuple[int, int]] = Field(
        default_factory=list,
        description="Request sizes [width, height] run once at start, so that compilation (one graph per "
        "size) happens before the first job rather than during it.",
    )

    @classmethod
    def of(cls, entry: ModelEntry) -> FluxOptions:
        try:
            return cls.model_validate(entry.options)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise EngineError(f"catalog options: {problems}") from None

    def load(self) -> LoadOptions:
        return LoadOptions.model_validate(self.model_dump(include=set(LoadOptions.model_fields)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"options.device: {name!r} is not available on this machine (no CUDA device)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def interval_schedule(guidance: float, interval: float) -> Callable[[float], float]:
    """flux-pro's ``interval``: full guidance while sigma >= 1 - interval/4, no extra guidance after."""
    threshold = 1.0 - interval / 4.0

    def at(sigma: float) -> float:
        return guidance if sigma >= threshold - 1e-6 else UNGUIDED

    return at


def generation_size(width: int, height: int, max_pixels: int | None, multiple: int = 16) -> tuple[int, int]:
    """The size to denoise at: the request's, or the largest same-aspect size within ``max_pixels``.

    Both sides are multiples of ``multiple`` (the VAE's 8x times FLUX's 2x2 packing). Under a budget, the
    short side steps through the multiples and the long side takes the multiple nearest the requested
    aspect (off by at most half a multiple); the largest pair that fits wins. The image is resized to the
    request afterwards.
    """

    def snap(value: float) -> int:
        return max(multiple, round(value / multiple) * multiple)

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


def quantize_weights(pipe: FluxPipeline, kind: str) -> None:
    """Quantize the linear layers of the two big modules in place (shared by every derived pipeline)."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise EngineError("options.quantize: needs torchao (pip install torchao)") from None
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    for module in (pipe.transformer, pipe.text_encoder_2):
        quantize_(module, config)


def batch_invariant(pipe: FluxPipeline) -> None:
    """Make a batched call give each sample the bytes it gets alone, so batching never changes an image.

    Two parts of a FLUX call are not batch-invariant on their own: the linear layers that see one row per
    sample (timestep, guidance and text embedders, AdaLN modulation) take a matrix-vector path alone and a
    matrix-matrix path in a batch, which round differently; and the VAE decodes a batch differently from
    one image. Those linears run row by row (tiny next to the token matmuls, which are already invariant)
    and the VAE decodes sample by sample (``enable_slicing``). A lone request runs the stock code.
    """
    for module in pipe.transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _rowwise(module.forward)
    pipe.vae.enable_slicing()


def _rowwise(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def rows(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > 1:
            return torch.cat([forward(row) for row in x.split(1)])
        return forward(x)

    return rows


class FluxModel:
    """One set of FLUX weights in memory and the three pipelines that share them.

    ``lock`` serialises generation: the pipelines share modules and a scheduler, so one job at a time.
    """

    def __init__(self, weights: Path, options: LoadOptions | None = None) -> None:
        self.weights = weights
        self.options = options or LoadOptions()
        self.device = resolve_device(self.options.device)
        dtype = resolve_dtype(self.options.dtype, self.device)
        try:
            text2image = FluxPipeline.from_pretrained(weights, dtype=dtype)
        except Exception as exc:
            raise EngineError(f"cannot load FLUX weights from {weights}: {_reason(exc)}") from exc
        self.text2image = text2image
        # from_pipe casts the shared modules to ``dtype`` (float32 when not given): pass theirs. The cast
        # warns about float32-only modules even when there are none; that warning is muted here.
        with _quiet("diffusers.models.modeling_utils"):
            self.kontext = FluxKontextPipeline.from_pipe(text2image, dtype=dtype)
            self.img2img = FluxImg2ImgPipeline.from_pipe(text2image, dtype=dtype)
        self.redux: FluxPriorReduxPipeline | None = None
        if self.options.redux:
            try:
                self.redux = FluxPriorReduxPipeline.from_pretrained(self.options.redux, dtype=dtype)
            except Exception as exc:
                raise EngineError(f"options.redux: cannot load {self.options.redux}: {_reason(exc)}") from exc
        for pipe in self.pipelines:
            pipe.set_progress_bar_config(disable=True)
        self._apply_options()
        self.lock = threading.Lock()
        tokenizer_length = getattr(text2image.tokenizer_2, "model_max_length", MAX_SEQUENCE_LENGTH)
        self.max_sequence_length = min(MAX_SEQUENCE_LENGTH, tokenizer_length)
        self.multiple = text2image.vae_scale_factor * 2
        self.takes_guidance = bool(text2image.transformer.config.get("guidance_embeds", False))
        self._guidance_at: Callable[[float], float] | None = None
        self._guidance_used: list[float] = []
        if self.takes_guidance:
            text2image.transformer.register_forward_pre_hook(self._scheduled_guidance, with_kwargs=True)

    @property
    def pipelines(self) -> tuple[FluxPipeline, FluxKontextPipeline, FluxImg2ImgPipeline]:
        return self.text2image, self.kontext, self.img2img

    def _apply_options(self) -> None:
        """Place the modules and turn on the configured speed and memory knobs."""
        options = self.options
        if not options.cpu_offload:
            with self._knob("device"):
                self.text2image.to(self.device)
                if self.redux is not None:
                    self.redux.to(self.device)
        if options.quantize:
            with self._knob("quantize"):
                quantize_weights(self.text2image, options.quantize)
        if options.cpu_offload:
            with self._knob("cpu_offload"):
                # The hooks sit on the shared modules and each pipeline re-arms its own after a call.
                for pipe in (*self.pipelines, *([self.redux] if self.redux is not None else [])):
                    pipe.enable_model_cpu_offload(device=self.device)
        if options.attention:
            with self._knob("attention"):
                self.text2image.transformer.set_attention_backend(options.attention)
        if options.vae_tiling:
            with self._knob("vae_tiling"):
                self.text2image.vae.enable_tiling()
        batch_invariant(self.text2image)
        if options.compile:
            with self._knob("compile"):
                # The forward, not the module: the guidance-schedule pre-hook stays outside the graph.
                transformer = self.text2image.transformer
                transformer.forward = torch.compile(
                    transformer.forward, backend=options.compile_backend, mode=options.compile_mode
                )

    @contextmanager
    def _knob(self, name: str) -> Iterator[None]:
        """Report a knob that fails as the catalog option it came from, with the library's reason."""
        try:
            yield
        except Exception as exc:
            value = getattr(self.options, name)
            raise EngineError(f"options.{name}={value!r}: {_reason(exc)}") from exc

    @contextmanager
    def guidance_schedule(self, at: Callable[[float], float] | None) -> Iterator[list[float]]:
        """While inside, each denoising step's guidance is ``at(sigma)``; yields the values used.

        Call with ``lock`` held: the schedule is the model's state for the one generation running.
        """
        self._guidance_at, self._guidance_used = at, []
        try:
            yield self._guidance_used
        finally:
            self._guidance_at = None

    def _scheduled_guidance(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """A forward pre-hook on the transformer: the pipelines take one guidance value for all steps."""
        guidance = kwargs.get("guidance")
        if self._guidance_at is None or guidance is None:
            return None
        value = self._guidance_at(float(kwargs["timestep"].flatten()[0]))
        self._guidance_used.append(value)
        return args, {**kwargs, "guidance": torch.full_like(guidance, value)}

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights (parameters and buffers of every module, quantized ones as stored)."""
        total = 0
        for component in self.text2image.components.values():
            if isinstance(component, torch.nn.Module):
                total += sum(_tensor_bytes(t) for t in [*component.parameters(), *component.buffers()])
        return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage of a tensor; a quantized tensor subclass is counted by the inner tensors it holds."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


@dataclass
class _Plan:
    pipe: Any
    kwargs: dict[str, Any]
    width: int
    height: int
    steps: int
    guidance: float
    schedule: Callable[[float], float] | None
    details: dict[str, Any]
    prepare: Callable[[], dict[str, Any]] | None = None  # more arguments, computed under the model lock


class DiffusersFluxEngine:
    """One API model (a catalog entry) served by a :class:`FluxModel`, possibly shared with other routes."""

    def __init__(self, weights: Path, entry: ModelEntry, model: FluxModel | None = None) -> None:
        self.entry = entry
        self.options = FluxOptions.of(entry)
        self.model = model or FluxModel(Path(weights), self.options.load())

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
        return self.options.max_sequence_length or self.model.max_sequence_length

    @property
    def max_batch(self) -> int:
        """How many compatible requests a worker may hand to :meth:`generate_batch` at once."""
        return self.options.max_batch

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult:
        result = self.generate_batch([request], [hooks])[0]
        if isinstance(result, JobCanceled):
            raise result
        return result

    def batch_key(self, request: EngineRequest) -> Hashable | None:
        """Requests with equal keys can share one pipeline call; None: this one runs alone.

        Text-to-image requests batch when their generation size, steps and guidance (schedule) agree;
        requests with images do not. Raises EngineError for a request the engine would refuse.
        """
        return self._key(request, self._plan(request))

    def _key(self, request: EngineRequest, plan: _Plan) -> Hashable | None:
        if plan.pipe is not self.model.text2image or plan.kwargs or plan.prepare:
            return None
        return (plan.width, plan.height, plan.steps, plan.guidance, request.params.interval)

    def generate_batch(
        self, requests: Sequence[EngineRequest], hooks: Sequence[EngineHooks]
    ) -> list[EngineResult | JobCanceled]:
        """Run requests with one :meth:`batch_key` as one pipeline call; each keeps its own prompt and seed,
        and gets the image it would get alone.

        A canceled request gets JobCanceled in its place while the others go on; when every request is
        canceled the call stops at the next step.
        """
        plans = [self._plan(request) for request in requests]
        keys = {self._key(request, plan) for request, plan in zip(requests, plans, strict=True)}
        if len(requests) > 1 and (len(keys) != 1 or None in keys):
            raise ValueError("generate_batch: these requests cannot share a pipeline call (see batch_key)")
        plan = plans[0]
        canceled = [False] * len(requests)

        def on_step(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            for position, hook in enumerate(hooks):
                if not canceled[position]:
                    try:
                        hook.step((index + 1) / pipeline.num_timesteps)
                    except JobCanceled:
                        canceled[position] = True
            if all(canceled):
                raise JobCanceled()
            return {}

        arguments = {
            "prompt": [request.prompt for request in requests],
            "width": plan.width,
            "height": plan.height,
            "num_inference_steps": plan.steps,
            "guidance_scale": plan.guidance,
            "generator": [torch.Generator("cpu").manual_seed(request.seed) for request in requests],
            "max_sequence_length": self.max_sequence_length,
            "callback_on_step_end": on_step,
            **plan.kwargs,
        }
        if "true_cfg_scale" in plan.details:
            arguments |= {
                "true_cfg_scale": plan.details["true_cfg_scale"],
                "negative_prompt": [""] * len(requests),
            }
        with self.model.lock, self.model.guidance_schedule(plan.schedule) as used:
            try:
                if plan.prepare is not None:
                    arguments.update(plan.prepare())
                output = plan.pipe(**arguments)
            except JobCanceled:
                return [JobCanceled() for _ in requests]
            except Exception as exc:
                log.exception("pipeline failed", extra={"model": requests[0].params.model})
                raise EngineError(f"{requests[0].params.model}: generation failed: {_reason(exc)}") from exc
        results: list[EngineResult | JobCanceled] = []
        for request, details, image, stopped in zip(
            requests, [each.details for each in plans], output.images, canceled, strict=True
        ):
            if stopped:
                results.append(JobCanceled())
                continue
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

    def _plan(self, request: EngineRequest) -> _Plan:
        """Everything about a request that is decided before the pipeline runs; refuses bad inputs."""
        self._check_inputs(request)
        steps = request.params.steps or self.entry.steps or DEFAULT_STEPS
        guidance = request.params.guidance or self.entry.guidance or DEFAULT_GUIDANCE
        width, height = generation_size(
            request.width, request.height, self.entry.max_pixels, self.model.multiple
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
        plan = _Plan(self.model.text2image, {}, width, height, steps, guidance, schedule, details)
        self._route(request, plan)
        if self.options.true_cfg_scale > 1 and plan.prepare is None:
            details["true_cfg_scale"] = self.options.true_cfg_scale
        return plan

    def _check_inputs(self, request: EngineRequest) -> None:
        """Refuse oversized inputs, and inputs the route has no use for, before any work."""
        limit = self.entry.max_input_pixels
        named = [(named.field, named.image) for named in request.images]
        if request.image_prompt is not None:
            named.append(("image_prompt", request.image_prompt))
        for name, image in named:
            if image.width * image.height > limit:
                raise EngineError(
                    f"{name}: {image.width}x{image.height} is {image.width * image.height} pixels; "
                    f"{request.params.model} accepts at most {limit} pixels"
                )
        if request.images and request.spec.family is not Family.KONTEXT:
            raise EngineError(f"input_image: {request.params.model} does not take input images")

    def _route(self, request: EngineRequest, plan: _Plan) -> None:
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


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` while inside."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, short enough for a job's error field."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
