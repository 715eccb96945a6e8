"""Builders for every part of the bundled FLUX pipeline, from code alone (no hub downloads).

The pipeline is the stock diffusers layout: a FluxTransformer2DModel, an AutoencoderKL, CLIP and T5 text
encoders with their tokenizers, and a flow-matching Euler scheduler, so the server loads it exactly like
real FLUX weights. Tokenizers are word-level over the scene vocabulary: each caption word is one token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)

from fluxserve.engines.tiny import clip_text_encoder, t5_text_encoder
from training.scenes import SYNONYMS, vocabulary

LATENT_CHANNELS = 16
MAX_TOKENS = 32  # T5 max_sequence_length and CLIP context length
SAMPLING_SHIFT = 3.0  # static flow-matching shift, shared by training's timestep sampler and the scheduler
TEXT_DIM = 64

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the base symbols CLIP's byte-level BPE works on."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_clip_tokenizer(words: list[str]) -> CLIPTokenizer:
    """Byte-level BPE whose merges rebuild each vocabulary word left to right into a single token.

    Merges past the first step of every word rank before all first-step merges, and first steps are ordered
    so that a word's own first pair always wins over any other word's first pair found inside it; every word
    is then checked to come out as one token.
    """
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {CLIP_BOS: 0, CLIP_EOS: 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    first: list[tuple[str, str]] = []
    later: list[tuple[str, str]] = []
    for word in words:
        if len(word) == 1:
            continue
        symbols = [*word[:-1], word[-1] + "</w>"]
        prefix = symbols[0]
        for i, sym in enumerate(symbols[1:]):
            pair = (prefix, sym)
            (first if i == 0 else later).append(pair)
            prefix = prefix + sym
            vocab.setdefault(prefix, len(vocab))
    first = list(dict.fromkeys(first))
    later = list(dict.fromkeys(later))
    # Order first-step pairs: a word's own first pair must precede any other first pair occurring in it.
    after: dict[tuple[str, str], set[tuple[str, str]]] = {p: set() for p in first}
    for word in words:
        if len(word) == 1:
            continue
        symbols = [*word[:-1], word[-1] + "</w>"]
        own = (symbols[0], symbols[1])
        for j in range(1, len(symbols) - 1):
            other = (symbols[j], symbols[j + 1])
            if other in after and other != own:
                after[own].add(other)
    ordered: list[tuple[str, str]] = []
    indeg = {p: 0 for p in first}
    for p in first:
        for q in after[p]:
            indeg[q] += 1
    ready = [p for p in first if indeg[p] == 0]
    while ready:
        p = ready.pop(0)
        ordered.append(p)
        for q in sorted(after[p]):
            indeg[q] -= 1
            if indeg[q] == 0:
                ready.append(q)
    if len(ordered) != len(first):
        raise ValueError("vocabulary has circular first-pair conflicts; rename a word")
    merges = later + ordered
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    for word in words:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"CLIP tokenizer splits {word!r} into {tok.convert_ids_to_tokens(ids)}")
    return tok


def build_t5_tokenizer(words: list[str]) -> T5TokenizerFast:
    """Unigram tokenizer whose pieces are whole words (high score) over a character fallback (low score)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for w in words:
        variants = [f"▁{w}", w] if not w.isalpha() else [f"▁{w}", f"▁{w.capitalize()}", f"▁{w.upper()}"]
        for piece in variants:
            if piece not in seen:
                pieces.append((piece, -1.0))
                seen.add(piece)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789-'\"()":
        if ch not in seen:
            pieces.append((ch, -12.0))
            seen.add(ch)
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def tie_words(
    clip: CLIPTextModel, t5: T5EncoderModel, clip_tok: CLIPTokenizer, t5_tok: T5TokenizerFast
) -> None:
    """Give a word's variants its own embedding: "▁Red" and "▁RED" read as "▁red" (T5), and every synonym
    (``SYNONYMS``: "centre", "violet", "dot", ...) as its trained word in both encoders.

    A T5TokenizerFast reloaded from disk drops any custom normaliser, so case is handled by the vocabulary:
    training only uses lower-case captions and the variants share its rows. Synonyms never appear in
    training captions; their rows are copies, so a prompt that uses them encodes exactly as the trained one.
    """
    emb = t5.get_input_embeddings().weight
    vocab = t5_tok.get_vocab()
    clip_emb = clip.get_input_embeddings().weight
    clip_vocab = clip_tok.get_vocab()
    with torch.no_grad():
        for synonym, word in SYNONYMS.items():
            clip_emb[clip_vocab[f"{synonym}</w>"]] = clip_emb[clip_vocab[f"{word}</w>"]]
            emb[vocab[f"▁{synonym}"]] = emb[vocab[f"▁{word}"]]
        for piece, idx in vocab.items():
            if piece.startswith("▁") and piece[1:] != piece[1:].lower() and f"▁{piece[1:].lower()}" in vocab:
                emb[idx] = emb[vocab[f"▁{piece[1:].lower()}"]]


def build_text_encoders(
    clip_tok: CLIPTokenizer, t5_tok: T5TokenizerFast
) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Two tiny encoders. Both give text tokens order information (CLIP: absolute, T5: relative)."""
    clip = clip_text_encoder(clip_tok, TEXT_DIM, layers=2, positions=MAX_TOKENS)
    t5 = t5_text_encoder(t5_tok, TEXT_DIM, layers=2, head_dim=32, buckets=16, max_distance=MAX_TOKENS)
    return clip, t5


def build_vae(channels: tuple[int, ...] = (8, 16, 32, 64)) -> AutoencoderKL:
    """8x downsampling: 128x128 pixels -> 16x16 latents -> 64 packed image tokens.

    16 latent channels as FLUX has: with 4 (tried first) an 8x8 cell holding an object edge cannot carry two
    colours and the edge, and reconstructions came out blurred and miscoloured.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=1,
        sample_size=128,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


def build_transformer(
    width: int = 128, heads: int = 4, double: int = 2, single: int = 4
) -> FluxTransformer2DModel:
    head_dim = width // heads
    rope_xy = (head_dim * 3 // 8) // 2 * 2
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=(head_dim - 2 * rope_xy, rope_xy, rope_xy),
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=SAMPLING_SHIFT, use_dynamic_shifting=False
    )


def build_tokenizers() -> tuple[CLIPTokenizer, T5TokenizerFast]:
    words = vocabulary() + [w for w in SYNONYMS if w not in vocabulary()]
    return build_clip_tokenizer(words), build_t5_tokenizer(words)


def build_modules(
    clip_tok: CLIPTokenizer,
    t5_tok: T5TokenizerFast,
    width: int = 128,
    heads: int = 4,
    double: int = 2,
    single: int = 4,
) -> torch.nn.ModuleDict:
    """What training learns, keyed as in its checkpoints. The encoders are made before the transformer:
    a seeded run's initial weights depend on that order."""
    clip, t5 = build_text_encoders(clip_tok, t5_tok)
    transformer = build_transformer(width, heads, double, single)
    return torch.nn.ModuleDict({"transformer": transformer, "clip": clip, "t5": t5})


def true_cfg(scale: float, negative: str | list[str]) -> dict[str, Any]:
    """Pipeline arguments for true classifier-free guidance against the empty prompt, as the catalog's
    `true_cfg_scale` samples the model; none at scale 1 or below."""
    return {"negative_prompt": negative, "true_cfg_scale": scale} if scale > 1 else {}


def load_pipeline_weights(
    modules: torch.nn.ModuleDict, folder: Path, clip_tok: CLIPTokenizer, t5_tok: T5TokenizerFast
) -> None:
    """Load an exported pipeline's transformer and text encoders into modules built by `build_modules`.

    The folder's tokenizers may have fewer words (an older vocabulary): each token embedding row is copied
    by its token's text, and rows of words the folder does not have keep their fresh initialisation.
    """
    parts = {
        "transformer": FluxTransformer2DModel.from_pretrained(str(folder / "transformer")),
        "clip": CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
        "t5": T5EncoderModel.from_pretrained(str(folder / "text_encoder_2")),
    }
    old_toks = {
        "clip": (CLIPTokenizer.from_pretrained(str(folder / "tokenizer")), clip_tok),
        "t5": (T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2")), t5_tok),
    }
    for key, model in parts.items():
        state = model.state_dict()
        if key in old_toks:
            old, new = old_toks[key]
            name = next(
                n
                for n, p in modules[key].named_parameters()
                if p is modules[key].get_input_embeddings().weight
            )
            rows = modules[key].get_input_embeddings().weight.detach().clone()
            old_vocab = old.get_vocab()
            for token, idx in new.get_vocab().items():
                if token in old_vocab:
                    rows[idx] = state[name][old_vocab[token]]
            state[name] = rows
            if key == "t5":  # T5 keeps a second reference to the shared table
                state = {k: (rows if k.endswith("embed_tokens.weight") else v) for k, v in state.items()}
        modules[key].load_state_dict(state)


def save_pipeline(
    out: Path,
    modules: torch.nn.ModuleDict,
    vae: AutoencoderKL,
    clip_tok: CLIPTokenizer,
    t5_tok: T5TokenizerFast,
) -> None:
    """Write the folder FluxPipeline and FluxKontextPipeline both load with `from_pretrained`.

    Case variants and synonyms are tied first, so the saved encoders read "RED" and "scarlet" as "red".
    """
    tie_words(modules["clip"], modules["t5"], clip_tok, t5_tok)
    pipe = FluxPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=modules["clip"],
        tokenizer=clip_tok,
        text_encoder_2=modules["t5"],
        tokenizer_2=t5_tok,
        transformer=modules["transformer"],
    )
    pipe.save_pretrained(str(out), safe_serialization=True)


@torch.no_grad()
def encode_text(
    clip: CLIPTextModel,
    t5: T5EncoderModel,
    clip_tok: CLIPTokenizer,
    t5_tok: T5TokenizerFast,
    prompts: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same tokenisation as FluxPipeline.encode_prompt; training calls the encoders with grad enabled."""
    return _encode(clip, t5, clip_tok, t5_tok, prompts)


def tokenize(
    clip_tok: CLIPTokenizer, t5_tok: T5TokenizerFast, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    c = clip_tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    t = t5_tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return c.input_ids, t.input_ids


def _encode(clip, t5, clip_tok, t5_tok, prompts):  # type: ignore[no-untyped-def]
    clip_ids, t5_ids = tokenize(clip_tok, t5_tok, prompts)
    pooled = clip(clip_ids, output_hidden_states=False).pooler_output
    seq = t5(t5_ids, output_hidden_states=False)[0]
    return seq, pooled
