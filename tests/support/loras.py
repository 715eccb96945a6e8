"""LoRA adapters made in the tests: peft adapters with random weights on a pipeline's transformer, saved with
diffusers' ``save_lora_weights`` (the format ``fluxserve finetunes add`` takes)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, FluxPipeline, FluxTransformer2DModel, ModelMixin
from peft import LoraConfig, get_peft_model_state_dict

from fluxserve.engines.base import Adapter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(
    weights: Path,
    out: Path,
    seed: int = 0,
    rank: int = 4,
    scale: float = 1.0,
    pipeline: type[DiffusionPipeline] = FluxPipeline,
    transformer_class: type[ModelMixin] = FluxTransformer2DModel,
) -> Path:
    """A rank-``rank`` adapter of random weights (times ``scale``) for the transformer in ``weights`` (a
    ``pipeline`` folder whose transformer is a ``transformer_class``)."""
    transformer = transformer_class.from_pretrained(weights / "transformer")
    torch.manual_seed(seed)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
    )
    state = {name: tensor * scale for name, tensor in get_peft_model_state_dict(transformer).items()}
    pipeline.save_lora_weights(out, transformer_lora_layers=state)
    return out / "pytorch_lora_weights.safetensors"


def adapter(path: Path, strength: float = 1.0, name: str = "test") -> Adapter:
    """The engine's view of a finetune stored in ``path``."""
    return Adapter(name, f"file:{path}", strength, path.read_bytes)
