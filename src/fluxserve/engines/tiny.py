"""A tiny, untrained FLUX pipeline (and a FLUX Redux prior for it) built offline, so the real diffusers
loading and sampling code can run anywhere: on a fresh install with no weights, and in tests.

Every part is the stock FLUX layout (FluxTransformer2DModel, an 8x AutoencoderKL, CLIP and T5 encoders with
their tokenizers, a flow-matching Euler scheduler), only very small; the tokenizers are made in code
(character-level) because nothing may come from a model hub. Its images are noise: it is for plumbing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxPriorReduxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

# Bump when the recipe changes: a folder built by another recipe is rebuilt rather than reused.
RECIPE = "tiny-flux-1"
REDUX_RECIPE = "tiny-flux-redux-1"
MARKER = "fluxserve-tiny.json"
SEED = 0
TEXT_DIM = 32
CLIP_LENGTH = 77  # CLIP's context, as in real FLUX
T5_LENGTH = 128  # also the engine's max_sequence_length for this model: short keeps it fast
# Module initialisers draw from torch's global generator: one build at a time per process keeps the
# weights deterministic when threads build at once.
_BUILD_LOCK = threading.Lock()


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE with no merges: every character is a token, and any text encodes."""
    printable = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in printable:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LENGTH)


def _t5_tokenizer() -> T5TokenizerFast:
    """Unigram over single characters (and the word-start mark), like a T5 vocabulary cut to the bone."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -5.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_LENGTH)


def clip_text_encoder(tok: CLIPTokenizer, dim: int, layers: int, positions: int) -> CLIPTextModel:
    """A small CLIP text encoder sized to ``tok`` (also used by training/ for the bundled model)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=dim,
            intermediate_size=dim * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=positions,
            projection_dim=dim,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )


def t5_text_encoder(
    tok: T5TokenizerFast, dim: int, layers: int, head_dim: int, buckets: int, max_distance: int = 128
) -> T5EncoderModel:
    """A small T5 encoder sized to ``tok`` (also used by training/ for the bundled model)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tok),
            d_model=dim,
            d_kv=head_dim,
            d_ff=dim * 2,
            num_layers=layers,
            num_heads=2,
            relative_attention_num_buckets=buckets,
            relative_attention_max_distance=max_distance,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    )


def _pipeline() -> FluxPipeline:
    """All components, each initialised right after reseeding so the weights never depend on build order.

    Call under ``_BUILD_LOCK`` and ``torch.random.fork_rng`` (the caller's random state is left alone).
    """
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,  # like FLUX.1-dev: guidance is an input, so guidance settings are observable
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: 8x down, as the real FLUX VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,  # also the VAE tile size when tiling is on
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,  # FLUX's values, so the pipeline's latent scaling path is the real one
        shift_factor=0.1159,
    )
    torch.manual_seed(SEED + 2)
    clip = clip_text_encoder(clip_tok, TEXT_DIM, layers=1, positions=CLIP_LENGTH)
    torch.manual_seed(SEED + 3)
    t5 = t5_text_encoder(t5_tok, TEXT_DIM, layers=1, head_dim=16, buckets=8)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,  # FLUX.1-dev's scheduler settings
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def _redux() -> FluxPriorReduxPipeline:
    """A tiny FLUX Redux prior: a SigLIP image encoder and the projection into the T5 embedding space."""
    torch.manual_seed(SEED + 4)
    encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,  # 16 image tokens appended to the prompt's
        )
    )
    torch.manual_seed(SEED + 5)
    embedder = ReduxImageEncoder(redux_dim=32, txt_in_features=TEXT_DIM)
    return FluxPriorReduxPipeline(
        image_encoder=encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        image_embedder=embedder,
    )


RECIPES: dict[str, Callable[[], DiffusionPipeline]] = {RECIPE: _pipeline, REDUX_RECIPE: _redux}


def is_built(folder: Path, recipe: str = RECIPE) -> bool:
    """True when ``folder`` holds a complete build of ``recipe`` (the marker is written last)."""
    try:
        marker: dict[str, object] = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    try:
        return marker.get("recipe") == recipe
    except AttributeError:  # a marker that is not a JSON object
        return False


def build_tiny_flux(folder: Path) -> Path:
    """Make the tiny FLUX pipeline at ``folder`` unless a complete one is already there; return ``folder``."""
    return _build(Path(folder), RECIPE)


def build_tiny_redux(folder: Path) -> Path:
    """Make the tiny FLUX Redux prior (for ``options.redux``) at ``folder``, like :func:`build_tiny_flux`."""
    return _build(Path(folder), REDUX_RECIPE)


def _build(folder: Path, recipe: str) -> Path:
    """Safe when several processes start at once: each builds in its own temporary folder beside the
    target and renames it into place; the first rename wins and the others discard their copy. A folder
    left by another recipe or an interrupted foreign copy is moved aside first, never written into.
    """
    if is_built(folder, recipe):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
    try:
        with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
            pipeline = RECIPES[recipe]()
        pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER).write_text(json.dumps({"recipe": recipe, "seed": SEED}))
        staging.chmod(0o755)  # mkdtemp makes it private; the built model is not
        if folder.exists() and not is_built(folder, recipe):
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.replace(folder, stale / folder.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, folder)
        except OSError:
            if not is_built(folder, recipe):  # lost the race to something that is not a complete build
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
