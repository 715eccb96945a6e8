"""The diffusers engine's knobs, read from a catalog entry's ``options`` table; unknown keys are refused.

:class:`LoadOptions` are the ones that decide how weights are loaded and run (routes share one loaded model
only when these agree); :class:`FluxOptions` adds the per-route ones (image prompts, raw mode, true CFG,
batching, warm-up). The FLUX.2 and Fill engines take the loading knobs, ``max_sequence_length`` and
``warmup``; the FLUX.1-only ones (:data:`FLUX1_ONLY`) are refused on their routes rather than ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fluxserve.core.catalog import ModelEntry
from fluxserve.errors import EngineError


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
    quantize: Literal["int8", "fp8", "fp8-compute"] | None = Field(
        default=None,
        description="Quantization of the transformer and the large text encoder with torchao. int8 and "
        "fp8 are weight-only: they halve bf16 weights but compute in bf16, so they save memory, not time "
        "(int8 runs anywhere; fp8 is slow without fp8 hardware). fp8-compute quantizes activations too "
        "(dynamic, one scale per row) so the matmuls run in fp8: faster as well, and used with compile; it "
        "needs an fp8 GPU (CUDA compute capability 8.9+: Ada, Hopper) and is refused elsewhere.",
    )
    redux: str | None = Field(
        default=None,
        description="Folder of a FLUX Redux prior (FluxPriorReduxPipeline) for image_prompt; "
        "builtin:tiny-redux for the tiny one. None: image_prompt runs img2img.",
    )
    max_adapters: int = Field(
        default=4,
        ge=1,
        description="Finetunes (LoRA adapters) kept loaded in the transformer at once; the least recently "
        "used one's slot is reused (hot-swapped where diffusers can) for the next.",
    )
    compile: bool = Field(default=False, description="torch.compile the transformer's forward.")
    compile_backend: str = Field(default="inductor", description="torch.compile backend.")
    compile_mode: str | None = Field(default=None, description="torch.compile mode, e.g. max-autotune.")


# Knobs only the FLUX.1 engine (engines/flux/engine.py) honours.
FLUX1_ONLY = frozenset({"redux", "image_prompt_strength", "raw_guidance", "true_cfg_scale", "max_batch"})


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
        default=None,
        gt=0,
        description="Prompt tokens (T5's on FLUX.1 and Fill, the Mistral or Qwen encoder's on FLUX.2); "
        "default the tokenizer's length, at most 512.",
    )
    native_size: int | None = Field(
        default=None,
        gt=0,
        description="For a model trained at one square size only (the bundled one: 128): each image is "
        "generated at that size and resized to the requested one, whatever its aspect (at a latent grid it "
        "never saw, such a model draws streaks along the edges). None: the requested aspect, in max_pixels.",
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

    def single_pipeline(self, engine: str) -> FluxOptions:
        """These options for an engine that runs one pipeline (``engine`` names it in the error): the
        FLUX.1-only knobs, when set, are refused."""
        refused = sorted(self.model_fields_set & FLUX1_ONLY)
        if refused:
            raise EngineError(f"catalog options: {', '.join(refused)}: FLUX.1 routes only, not {engine}")
        return self

    def load(self) -> LoadOptions:
        return LoadOptions.model_validate(self.model_dump(include=set(LoadOptions.model_fields)))
