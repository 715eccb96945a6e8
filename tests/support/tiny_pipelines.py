"""Tiny, untrained FLUX.2 ([dev] and [klein]) and FLUX.1 Fill pipelines built offline for the tests, saved
with ``save_pretrained`` so the engines load them with ``from_pretrained`` (the real loading path).

Each part is the stock layout, only very small. The text encoders keep the layer counts whose hidden
states the pipelines read (Mistral: 10, 20, 30; Qwen3: 9, 18, 27), at width 16, so the stock call runs
unchanged. The tokenizers are byte-level BPE with no merges (every byte a token) made in code, with a chat
template that renders the user's text alone: a character-level tokenizer would otherwise spend its short
context on the system message. FLUX.2 [dev]'s real tokenizer is a PixtralProcessor, which needs
torchvision; the pipeline only calls its ``apply_chat_template``, which a tokenizer has too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fluxserve.engines.tiny import TEXT_DIM, build_tiny_flux

WIDTH = 16  # text encoders' hidden size; the transformer sees 3 stacked layers of it
TEXT_LENGTH = 64
USER_TEXT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endif %}{% endfor %}"
)


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    vocab = {token: index for index, token in enumerate(specials)}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    return vocab


def _vae() -> AutoencoderKLFlux2:
    torch.manual_seed(1)
    return AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),  # 8x down, as the real one
        layers_per_block=1,
        latent_channels=4,  # 16 after the 2x2 patchify
        norm_num_groups=4,
        sample_size=64,
    )


def _transformer(guidance: bool) -> Flux2Transformer2DModel:
    torch.manual_seed(2)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * WIDTH,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,
    )


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.2's: the pipelines compute their own shift (mu) per image size and step count
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
    )


def _dev() -> Flux2Pipeline:
    specials = ["<unk>", "<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    backend = Tokenizer(models.BPE(vocab=_byte_vocab(specials), merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=TEXT_LENGTH,
    )
    tokenizer.chat_template = USER_TEXT
    torch.manual_seed(3)
    encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=MistralConfig(
                vocab_size=len(tokenizer),
                hidden_size=WIDTH,
                intermediate_size=2 * WIDTH,
                num_hidden_layers=30,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                pad_token_id=tokenizer.pad_token_id,
                max_position_embeddings=2 * TEXT_LENGTH,
            ),
            vision_config=PixtralVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                head_dim=8,
                image_size=32,
                patch_size=8,
            ),
            image_token_index=specials.index("[IMG]"),
        )
    )
    return Flux2Pipeline(
        scheduler=_scheduler(),
        vae=_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=_transformer(guidance=True),
    )


def _klein(distilled: bool) -> Flux2KleinPipeline:
    vocab = _byte_vocab(["<|endoftext|>"])
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], model_max_length=TEXT_LENGTH)
    tokenizer.chat_template = USER_TEXT
    torch.manual_seed(4)
    encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=WIDTH,
            intermediate_size=2 * WIDTH,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=2 * TEXT_LENGTH,
        )
    )
    return Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=_transformer(guidance=False),
        is_distilled=distilled,
    )


def _fill(root: Path) -> FluxFillPipeline:
    """The tiny FLUX.1 pipeline's encoders and VAE with a Fill transformer: its input is the noisy latents,
    the masked image's latents (16 channels each, packed) and the mask (8x8 pixels a latent, packed 2x2)."""
    flux = FluxPipeline.from_pretrained(build_tiny_flux(root / "tiny"))
    torch.manual_seed(5)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 + 16 + 256,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    parts = {name: flux.components[name] for name in ("scheduler", "vae", "text_encoder", "tokenizer")}
    parts |= {name: flux.components[name] for name in ("text_encoder_2", "tokenizer_2")}
    return FluxFillPipeline(**parts, transformer=transformer)


RECIPES: dict[str, Callable[[Path], DiffusionPipeline]] = {
    "tiny-flux2-dev": lambda root: _dev(),
    "tiny-flux2-klein": lambda root: _klein(distilled=True),
    "tiny-flux2-klein-base": lambda root: _klein(distilled=False),
    "tiny-flux-fill": _fill,
}


def tiny_pipeline(root: Path, name: str) -> Path:
    """The tiny pipeline ``name`` (one of :data:`RECIPES`) saved under ``root``, built on first use."""
    folder = root / name
    if not (folder / "model_index.json").is_file():
        with torch.random.fork_rng(devices=[]):
            RECIPES[name](root).save_pretrained(folder, safe_serialization=True)
    return folder
