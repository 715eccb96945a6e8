"""Helpers shared by the engine tests: a tiny FLUX pipeline, requests, and image comparisons."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from fluxserve.core.catalog import ModelEntry
from fluxserve.core.fields import input_image_field
from fluxserve.core.params import GenerationParams
from fluxserve.engines.base import EngineHooks, EngineRequest, NamedImage
from fluxserve.engines.tiny import build_tiny_flux


def tiny_weights(root: Path) -> Path:
    return build_tiny_flux(root / "tiny")


def entry(**fields: Any) -> ModelEntry:
    """A catalog entry for the tiny model: 2 steps, no max_pixels unless given."""
    return ModelEntry.model_validate({"weights": "builtin:tiny", "steps": 2, **fields})


REQUEST_FIELDS = {"width", "height", "seed", "images", "image_prompt", "resume", "adapter"}


def request(model: str = "flux-dev", **fields: Any) -> EngineRequest:
    """An engine request; ``images`` may be bare images (named input_image, input_image_2... in order)."""
    values: dict[str, Any] = {
        "prompt": "a red fox in the snow",
        "width": 64,
        "height": 64,
        "seed": 7,
        **fields,
    }
    values["images"] = [
        image if isinstance(image, NamedImage) else NamedImage(input_image_field(index), image)
        for index, image in enumerate(values.get("images", []))
    ]
    params = GenerationParams(model=model, **{k: v for k, v in values.items() if k not in REQUEST_FIELDS})
    return EngineRequest(
        params, prompt=params.prompt, **{k: v for k, v in values.items() if k in REQUEST_FIELDS}
    )


class Recorder:
    """EngineHooks whose progress is recorded and whose cancel flag turns on after ``cancel_after`` steps."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.fractions: list[float] = []
        self.cancel_after = cancel_after

    @property
    def hooks(self) -> EngineHooks:
        return EngineHooks(progress=self.fractions.append, canceled=self._canceled)

    def _canceled(self) -> bool:
        return self.cancel_after is not None and len(self.fractions) >= self.cancel_after


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def solid(color: str, size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def gradient(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A non-uniform picture, so that what the VAE sees of it is not just one colour."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    return Image.merge("RGB", (image.getchannel(0), image.getchannel(0).rotate(90), Image.new("L", size, 40)))
