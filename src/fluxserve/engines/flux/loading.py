"""One set of FLUX weights in memory, the pipelines that share it, and the loading knobs.

The weights are loaded once (``from_pretrained``) and the other pipelines (kontext, img2img) are derived
with ``from_pipe``, which shares every module: one copy of the weights serves every path. An optional FLUX
Redux prior (``options.redux``) is loaded beside them for image prompts.

The pipelines take one guidance value for all steps; a forward pre-hook on the transformer replaces it per
step while a schedule is set (:meth:`FluxModel.guidance_schedule`), which is how flux-pro's ``interval``
runs (see :mod:`~fluxserve.engines.flux.planning`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxImg2ImgPipeline, FluxKontextPipeline, FluxPipeline, FluxPriorReduxPipeline

from fluxserve.engines.flux.options import LoadOptions
from fluxserve.errors import EngineError

MAX_SEQUENCE_LENGTH = 512  # FLUX.1's T5 context; a checkpoint whose tokenizer is shorter uses its own


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
            module.forward = _rowwise(module.forward)  # type: ignore[method-assign, assignment]
    pipe.vae.enable_slicing()


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
            raise EngineError(f"options.{name}={value!r}: {short_reason(exc)}") from exc

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
