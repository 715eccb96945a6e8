"""One set of FLUX weights in memory, the pipelines that share it, and the loading knobs.

The weights are loaded once (``from_pretrained``) and the other pipelines (kontext, img2img) are derived
with ``from_pipe``, which shares every module: one copy of the weights serves every path. An optional FLUX
Redux prior (``options.redux``) is loaded beside them for image prompts.

The knobs (device, quantization, CPU offload, attention backend, VAE tiling, compilation) are applied by
:func:`tune` and :func:`compile_transformer`, which work on any diffusers pipeline: :class:`FluxModel`
(FLUX.1) and :class:`LoadedPipeline` (the base of the FLUX.2 and Fill models, one pipeline each) share them.

The pipelines take one guidance value for all steps; a forward pre-hook on the transformer replaces it per
step while a schedule is set (:meth:`FluxModel.guidance_schedule`), which is how flux-pro's ``interval``
runs (see :mod:`~fluxserve.engines.flux.planning`).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxPriorReduxPipeline,
)
from transformers import AutoTokenizer

from fluxserve.engines.flux.adapters import AdapterSlots
from fluxserve.engines.flux.options import LoadOptions
from fluxserve.errors import EngineError

MAX_SEQUENCE_LENGTH = 512  # FLUX.1's T5 context (FLUX.2's too); a shorter tokenizer's own length wins


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"options.device: {name!r} is not available on this machine (no CUDA device)")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def text_length(tokenizer: Any) -> int:
    """Prompt tokens to encode: the tokenizer's length, at most :data:`MAX_SEQUENCE_LENGTH`."""
    return min(MAX_SEQUENCE_LENGTH, getattr(tokenizer, "model_max_length", MAX_SEQUENCE_LENGTH))


def quantize_weights(modules: Sequence[torch.nn.Module], kind: str) -> None:
    """Quantize the linear layers of ``modules`` (the big ones: transformer and the large text encoder) in
    place, so every pipeline sharing them runs quantized. ``kind`` is :attr:`LoadOptions.quantize`; torchao
    refuses fp8-compute without fp8 hardware, which :func:`knob` reports as the option's error."""
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError:
        raise EngineError("options.quantize: needs torchao (pip install 'fluxserve[quant]')") from None
    configs = {
        "int8": Int8WeightOnlyConfig,
        "fp8": Float8WeightOnlyConfig,
        "fp8-compute": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }
    config = configs[kind]()
    for module in modules:
        quantize_(module, config)


@contextmanager
def knob(options: LoadOptions, name: str) -> Iterator[None]:
    """Report a knob that fails as the catalog option it came from, with the library's reason."""
    try:
        yield
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"options.{name}={getattr(options, name)!r}: {short_reason(exc)}") from exc


def tune(
    pipelines: Sequence[DiffusionPipeline],
    options: LoadOptions,
    device: torch.device,
    quantized: Sequence[torch.nn.Module],
) -> None:
    """Place the modules and turn on the configured memory and speed knobs (all but compilation, see
    :func:`compile_transformer`). ``pipelines[0]`` owns the transformer and VAE; the others share its
    modules or sit beside it (a Redux prior) and get the same placement."""
    main = pipelines[0]
    if not options.cpu_offload:
        with knob(options, "device"):
            for pipe in pipelines:
                pipe.to(device)
    if options.quantize:
        with knob(options, "quantize"):
            quantize_weights(quantized, options.quantize)
    if options.cpu_offload:
        with knob(options, "cpu_offload"):
            # The hooks sit on the shared modules and each pipeline re-arms its own after a call.
            for pipe in pipelines:
                pipe.enable_model_cpu_offload(device=device)
    if options.attention:
        with knob(options, "attention"):
            main.transformer.set_attention_backend(options.attention)
    if options.vae_tiling:
        with knob(options, "vae_tiling"):
            main.vae.enable_tiling()


def compile_transformer(transformer: torch.nn.Module, options: LoadOptions) -> None:
    """``torch.compile`` the transformer's forward when configured: the forward, not the module, so that
    forward hooks (FLUX.1's guidance schedule) stay outside the graph."""
    if options.compile:
        with knob(options, "compile"):
            transformer.forward = torch.compile(
                transformer.forward, backend=options.compile_backend, mode=options.compile_mode
            )


def pipeline_nbytes(pipe: DiffusionPipeline) -> int:
    """Bytes held by a pipeline's weights (parameters and buffers of every module, quantized as stored)."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(_tensor_bytes(t) for t in [*component.parameters(), *component.buffers()])
    return total


def load_pipeline(classes: Mapping[str, type[DiffusionPipeline]], weights: Path, dtype: torch.dtype) -> Any:
    """``from_pretrained`` of the folder's own pipeline class (its ``model_index.json``), when it is one of
    ``classes``; anything else is an EngineError that names the folder and what it holds."""
    try:
        name = DiffusionPipeline.load_config(weights)["_class_name"]
    except Exception as exc:
        raise EngineError(f"cannot load weights from {weights}: {short_reason(exc)}") from exc
    if name not in classes:
        raise EngineError(f"{weights} holds a {name} pipeline; this route needs one of {', '.join(classes)}")
    try:
        tokenizers = tokenizers_for_processors(weights)
        # Loaded without those components (diffusers checks a passed one against the class the folder
        # names, which cannot be imported), then given the tokenizers.
        pipe = classes[name].from_pretrained(weights, dtype=dtype, **dict.fromkeys(tokenizers))
        pipe.register_modules(**tokenizers)
        return pipe
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"cannot load {name} weights from {weights}: {short_reason(exc)}") from exc


# Processors whose import needs torchvision, which does not install beside this torch. The pipelines that
# name one (FLUX.2 [dev]: Mistral's PixtralProcessor) call only its tokenizer's chat template on text, so
# the tokenizer it wraps is loaded alone from the same folder (see :func:`tokenizers_for_processors`).
TOKENIZER_ONLY_PROCESSORS = frozenset({"PixtralProcessor"})


def tokenizers_for_processors(weights: Path) -> dict[str, Any]:
    """For each component of the folder's ``model_index.json`` that is one of
    :data:`TOKENIZER_ONLY_PROCESSORS`, the tokenizer in its subfolder, to use in its place: the vendor's
    layout then loads without torchvision."""
    index = json.loads((weights / "model_index.json").read_text())
    return {
        name: processor_tokenizer(weights / name)
        for name, spec in index.items()
        if isinstance(spec, list) and spec[-1] in TOKENIZER_ONLY_PROCESSORS
    }


def processor_tokenizer(folder: Path) -> Any:
    """The tokenizer a processor's folder holds, with the processor's chat template: processors keep it
    in ``chat_template.json`` (older saves) or ``chat_template.jinja``, which a tokenizer reads too."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = folder / "chat_template.json"
    if tokenizer.chat_template is None and template.is_file():
        tokenizer.chat_template = json.loads(template.read_text())["chat_template"]
    if tokenizer.chat_template is None:
        raise EngineError(f"{folder}: no chat template (chat_template.json or chat_template.jinja)")
    return tokenizer


def batch_invariant(pipe: FluxPipeline) -> None:
    """Make a batched call give each sample the bytes it gets alone, so batching never changes an image.

    Two parts of a FLUX call are not batch-invariant on their own: the linear layers that see one row per
    sample (timestep, guidance and text embedders, AdaLN modulation) take a matrix-vector path alone and a
    matrix-matrix path in a batch, which round differently; and the VAE decodes a batch differently from
    one image. Those linears run row by row (tiny next to the token matmuls, which are already invariant)
    and the VAE decodes sample by sample (``enable_slicing``). A lone request runs the stock code.
    """
    for module in pipe.transformer.modules():
        if isinstance(module, torch.nn.Linear) and module not in _ROWWISE:
            module.forward = _rowwise(module.forward)  # type: ignore[method-assign, assignment]
            _ROWWISE.add(module)  # called again once a LoRA adapter adds layers: wraps only those
    pipe.vae.enable_slicing()


_ROWWISE: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # linears batch_invariant has wrapped


def _rowwise(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def rows(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > 1:
            return torch.cat([forward(row) for row in torch.split(x, 1)])
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
            raise EngineError(f"cannot load FLUX weights from {weights}: {short_reason(exc)}") from exc
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
                raise EngineError(
                    f"options.redux: cannot load {self.options.redux}: {short_reason(exc)}"
                ) from exc
        for pipe in self.pipelines:
            pipe.set_progress_bar_config(disable=True)
        self._apply_options()
        # LoRA layers an adapter adds run row by row too, so batching stays invisible with finetunes.
        self.adapters = AdapterSlots(
            text2image, self.options.max_adapters, lambda: batch_invariant(text2image)
        )
        self.lock = threading.Lock()
        self.max_sequence_length = text_length(text2image.tokenizer_2)
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
        companions = [self.redux] if self.redux is not None else []
        text2image = self.text2image
        tune(
            [*self.pipelines, *companions],
            self.options,
            self.device,
            quantized=[text2image.transformer, text2image.text_encoder_2],
        )
        batch_invariant(text2image)
        compile_transformer(text2image.transformer, self.options)

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
        return pipeline_nbytes(self.text2image)


class LoadedPipeline:
    """One diffusers pipeline's weights in memory with the loading knobs applied: the base of the models
    that run a single pipeline (FLUX.2, Fill). ``lock`` serialises generation on it.

    A subclass names the pipeline classes its folder may hold (``PIPELINES``, by ``model_index.json``
    class name) and the modules quantization applies to (``QUANTIZED``, attribute names). FLUX.1-only
    options (``redux``...) are refused before loading, by :meth:`FluxOptions.single_pipeline`.
    """

    PIPELINES: ClassVar[Mapping[str, type[DiffusionPipeline]]]
    QUANTIZED: ClassVar[tuple[str, ...]]

    def __init__(self, weights: Path, options: LoadOptions | None = None) -> None:
        self.weights = weights
        self.options = options or LoadOptions()
        self.device = resolve_device(self.options.device)
        self.pipe = load_pipeline(self.PIPELINES, weights, resolve_dtype(self.options.dtype, self.device))
        self.pipe.set_progress_bar_config(disable=True)
        tune([self.pipe], self.options, self.device, [getattr(self.pipe, name) for name in self.QUANTIZED])
        compile_transformer(self.pipe.transformer, self.options)
        self.adapters = AdapterSlots(self.pipe, self.options.max_adapters)
        self.lock = threading.Lock()
        self.multiple: int = self.pipe.vae_scale_factor * 2

    @property
    def kind(self) -> str:
        """The loaded pipeline's class name, as results report it."""
        return type(self.pipe).__name__

    @property
    def nbytes(self) -> int:
        return pipeline_nbytes(self.pipe)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage of a tensor; a quantized tensor subclass is counted by the inner tensors it holds."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


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


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message, short enough for a job's error field."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
