"""Is a file a LoRA adapter for this model? Answered from safetensors headers alone, without loading weights.

An adapter in diffusers' format (what ``save_lora_weights`` writes, and peft's layout under
``transformer.``) holds, for each adapted linear layer of the transformer, ``<layer>.lora_A.weight``
(rank x in) and ``<layer>.lora_B.weight`` (out x rank). It fits a model when every such layer exists in the
model's transformer with an (out x in) weight: the transformer's own safetensors headers say so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

DEFAULT_MAX_BYTES = 1024**3  # the largest adapter accepted unless the operator says otherwise
_TENSOR = re.compile(r"transformer\.(?P<layer>.+)\.lora_(?P<part>[AB])\.weight")
FORMAT_HINT = (
    "expected diffusers' LoRA format: transformer.<layer>.lora_A.weight and .lora_B.weight for each "
    "adapted layer, as FluxPipeline.save_lora_weights writes"
)


class AdapterProblem(ValueError):
    """The file is not an adapter this model can use; the message says why, for the operator."""


@dataclass(frozen=True)
class AdapterInfo:
    """What the header says: the adapted layers with their (out, in) shapes, and the largest rank."""

    layers: dict[str, tuple[int, int]]
    rank: int


def shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the file's header only; AdapterProblem when it is no safetensors file."""
    try:
        with safe_open(path, framework="numpy") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise AdapterProblem(f"{path.name}: not a safetensors file ({str(exc)[:200]})") from None


def inspect(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> AdapterInfo:
    """The adapter in ``path``, or AdapterProblem naming the first thing wrong with it."""
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterProblem(f"{path.name}: {size} bytes is above the limit of {max_bytes} bytes")
    tensors = shapes(path)
    parts: dict[str, dict[str, list[int]]] = {}
    for name, shape in tensors.items():
        match = _TENSOR.fullmatch(name)
        if match is None or len(shape) != 2:
            raise AdapterProblem(f"{path.name}: tensor {name!r} {shape} is not a LoRA weight; {FORMAT_HINT}")
        parts.setdefault(match["layer"], {})[match["part"]] = shape
    if not parts:
        raise AdapterProblem(f"{path.name}: no tensors; {FORMAT_HINT}")
    layers: dict[str, tuple[int, int]] = {}
    rank = 0
    for layer, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterProblem(f"{path.name}: layer {layer} has no {missing}.weight")
        (rank_a, inputs), (outputs, rank_b) = pair["A"], pair["B"]
        if rank_a != rank_b:
            raise AdapterProblem(f"{path.name}: layer {layer}: lora_A has rank {rank_a}, lora_B {rank_b}")
        layers[layer] = (outputs, inputs)
        rank = max(rank, rank_a)
    return AdapterInfo(layers, rank)


def check_fits(info: AdapterInfo, weights: Path, name: str) -> None:
    """AdapterProblem unless every adapted layer is a linear layer of that shape in the transformer of the
    diffusers folder ``weights``."""
    files = sorted((weights / "transformer").glob("*.safetensors"))
    if not files:
        raise AdapterProblem(f"{weights}: no transformer/*.safetensors to check {name} against")
    model: dict[str, list[int]] = {}
    for file in files:
        model.update(shapes(file))
    for layer, (outputs, inputs) in info.layers.items():
        found = model.get(f"{layer}.weight")
        if found is None:
            raise AdapterProblem(
                f"{name}: layer {layer} is not a layer of the model's transformer ({weights})"
            )
        if found != [outputs, inputs]:
            raise AdapterProblem(
                f"{name}: layer {layer} is {outputs}x{inputs} in the adapter but {found[0]}x{found[1]} "
                f"in the model ({weights}): it was trained for other weights"
            )
