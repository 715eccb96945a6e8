"""The engine interface: a validated request in, an image out, with progress and cancellation."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from PIL import Image, ImageFilter

from fluxserve.core.fields import REFERENCE_FIELDS
from fluxserve.core.models import ModelSpec, spec_of
from fluxserve.core.params import GenerationParams
from fluxserve.errors import EngineError, JobCanceled


@dataclass
class NamedImage:
    """A decoded input image and the request field it came in (for error messages and the relay)."""

    field: str
    image: Image.Image


@dataclass(frozen=True)
class Adapter:
    """A finetune (LoRA adapter) as a request uses it (engines/flux/adapters.py loads it); equal adapters
    (same file and strength) may share a batch."""

    name: str  # the finetune_id, for messages and details
    file: str  # where its weights are (``blob:<key>``, ``builtin:<name>``): the loaded adapters' identity
    strength: float
    read: Callable[[], bytes] = field(compare=False, hash=False, repr=False)


@dataclass
class EngineRequest:
    """Everything an engine needs, already resolved: the validated parameters as the client sent them,
    the final prompt (upsampled or not), the final size and seed, and the decoded images."""

    params: GenerationParams
    prompt: str
    width: int
    height: int
    seed: int
    images: list[NamedImage] = field(default_factory=list)
    image_prompt: Image.Image | None = None
    resume: dict[str, Any] | None = None  # what an earlier attempt saved with ``hooks.checkpoint``
    adapter: Adapter | None = None  # the finetune (LoRA) to run with, on finetuned routes

    @property
    def spec(self) -> ModelSpec:
        return spec_of(self.params.model)

    @property
    def references(self) -> list[NamedImage]:
        """The reference images (``input_image`` .. ``input_image_8``), in field order."""
        return [named for named in self.images if named.field in REFERENCE_FIELDS]

    @property
    def source(self) -> Image.Image | None:
        """Fill's and expand's ``image``: the picture to repaint or grow."""
        return next((named.image for named in self.images if named.field == "image"), None)

    @property
    def mask(self) -> Image.Image | None:
        """Fill's ``mask`` as sent (white: repaint, black: keep); None: use the image's alpha."""
        return next((named.image for named in self.images if named.field == "mask"), None)

    def repaint_mask(self) -> Image.Image:
        """Fill: where to repaint, as an ``L`` image the size of ``source`` (255 repaint, 0 keep): the mask
        sent (any mode, thresholded at half), else where the image is transparent, grown by
        ``dilate_pixels`` (erase); EngineError when the request says neither, or the mask's size differs
        from the image's."""
        return dilate(self._repaint_mask(), self.params.dilate_pixels)

    def _repaint_mask(self) -> Image.Image:
        source = self.source
        if source is None:
            raise EngineError("image: is required")
        mask = self.mask
        if mask is not None:
            if mask.size != source.size:
                raise EngineError(
                    f"mask: must be the size of image ({source.width}x{source.height}), "
                    f"not {mask.width}x{mask.height}"
                )
            return mask.convert("L").point(lambda value: 255 if value >= 128 else 0)
        if "A" in source.getbands() or "transparency" in source.info:
            alpha = source.convert("RGBA").getchannel("A").point(lambda value: 255 if value < 128 else 0)
            if alpha.getbbox() is not None:  # some pixel is transparent
                return alpha
        raise EngineError("mask: is required unless image has transparent areas to repaint")

    @property
    def margins(self) -> tuple[int, int, int, int]:
        """Expand's (left, top, right, bottom) pixels added around ``source``."""
        return (self.params.left, self.params.top, self.params.right, self.params.bottom)


def dilate(mask: Image.Image, pixels: int) -> Image.Image:
    """``mask`` (``L``, 255 marked) grown by ``pixels`` in every direction (a square of side 2p + 1 around
    each marked pixel): erase paints over an object's edges too. Two one-dimensional box blurs, each
    thresholded, so the cost does not grow with ``pixels``."""
    if pixels <= 0:
        return mask
    for radius in ((pixels, 0), (0, pixels)):
        mask = mask.filter(ImageFilter.BoxBlur(radius)).point(lambda value: 255 if value > 0 else 0)
    return mask


@dataclass
class EngineResult:
    image: Image.Image
    prompt: str
    seed: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineHooks:
    """Callbacks from the engine to the worker: ``progress`` takes 0..1, ``canceled`` is polled.

    ``checkpoint`` saves engine state on the job (the relay's upstream task), so that an attempt after a
    crash gets it back as ``EngineRequest.resume`` and carries on instead of starting over.

    ``preview`` is offered, with the progress it goes with, a function that draws the image as it stands
    (a live preview); the worker calls it only when it wants one, so an engine offers it every step and
    decoding costs nothing while previews are off.
    """

    progress: Callable[[float], None] = lambda fraction: None
    canceled: Callable[[], bool] = lambda: False
    checkpoint: Callable[[dict[str, Any]], None] = lambda state: None
    preview: Callable[[float, Callable[[], Image.Image]], None] = lambda fraction, draw: None

    def step(self, fraction: float, draw: Callable[[], Image.Image] | None = None) -> None:
        """Report progress (and offer the preview ``draw`` makes), and stop the engine if the job was
        canceled meanwhile."""
        if draw is not None:
            self.preview(fraction, draw)
        self.progress(fraction)
        if self.canceled():
            raise JobCanceled()


class Engine(Protocol):
    """One loaded model that turns requests into images; workers call it from one thread at a time."""

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult: ...


class Engines(Protocol):
    """Where a worker gets the engine for an API model (the registry, built from the catalog)."""

    def get(self, model: str) -> Engine:
        """Raises EngineError when the model cannot be served here."""
        ...


PlanT = TypeVar("PlanT")


@runtime_checkable
class BatchingEngine(Protocol[PlanT]):
    """An engine that can run compatible requests as one call (same model, size, steps...).

    Each request is planned once (:meth:`plan`); the plan is what is keyed and run, so nothing about a
    request is decided twice. ``generate`` still plans and runs one request alone.
    """

    def generate(self, request: EngineRequest, hooks: EngineHooks) -> EngineResult: ...

    @property
    def max_batch(self) -> int: ...

    def plan(self, request: EngineRequest) -> PlanT:
        """Everything decided about a request before it runs; raises EngineError to refuse it."""
        ...

    def batch_key(self, plan: PlanT) -> Hashable | None:
        """Plans with equal keys may share a call; None: this one runs alone."""
        ...

    def generate_batch(
        self, plans: Sequence[PlanT], hooks: Sequence[EngineHooks]
    ) -> list[EngineResult | JobCanceled]: ...
