"""The shipped bundled model: loads offline with both FLUX pipelines and makes the image it is asked for."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxserve.engines.registry import BUNDLED_WEIGHTS
from training.model import MAX_TOKENS, build_modules, build_tokenizers, encode_text, tie_words
from training.scenes import SIZE, SYNONYMS, Scene, render, vocabulary


def test_tokenizers_keep_every_word_whole_and_ignore_case() -> None:
    clip_tok, t5_tok = build_tokenizers()
    for word in vocabulary() + list(SYNONYMS):
        assert len(clip_tok(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5_tok(word, add_special_tokens=False).input_ids) == 1, word
    lower = "a small red star in the top left corner, on a light blue background"
    assert clip_tok(lower.upper()).input_ids == clip_tok(lower).input_ids
    assert "<unk>" not in t5_tok.convert_ids_to_tokens(t5_tok(lower.capitalize()).input_ids)
    assert len(t5_tok(lower).input_ids) < MAX_TOKENS


def test_synonyms_encode_exactly_as_the_words_they_stand_for() -> None:
    """Both encoders read "one scarlet dot in the centre" as "a red circle in the center", nothing else."""
    clip_tok, t5_tok = build_tokenizers()
    modules = build_modules(clip_tok, t5_tok, width=32, heads=2, double=1, single=1)
    tie_words(modules["clip"], modules["t5"], clip_tok, t5_tok)
    prompts = [
        "a red circle in the center on a white background",
        "One Scarlet dot in the centre on a white backdrop",
        "a blue circle in the center on a white background",
    ]
    seq, pooled = encode_text(modules["clip"], modules["t5"], clip_tok, t5_tok, prompts)
    assert torch.equal(seq[0], seq[1]) and torch.equal(pooled[0], pooled[1])
    assert not torch.equal(seq[0], seq[2]) and not torch.equal(pooled[0], pooled[2])
    for synonym, word in SYNONYMS.items():
        assert word in vocabulary() and synonym != word


needs_weights = pytest.mark.skipif(
    not (BUNDLED_WEIGHTS / "model_index.json").exists(), reason="no bundled weights yet"
)


@needs_weights
def test_bundled_folder_is_small() -> None:
    total = sum(p.stat().st_size for p in BUNDLED_WEIGHTS.rglob("*") if p.is_file())
    assert total < 40 * 2**20


@needs_weights
def test_bundled_loads_offline_with_both_pipelines(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import FluxKontextPipeline, FluxPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = FluxPipeline.from_pretrained(str(BUNDLED_WEIGHTS), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    scene = Scene("circle", "yellow", "center", "large", "blue")
    image = pipe(
        prompt="A large yellow circle in the center on a blue background",
        height=SIZE,
        width=SIZE,
        num_inference_steps=20,
        max_sequence_length=MAX_TOKENS,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (SIZE, SIZE)

    kontext = FluxKontextPipeline.from_pretrained(str(BUNDLED_WEIGHTS), local_files_only=True)
    kontext.set_progress_bar_config(disable=True)
    edited = kontext(
        image=render(scene),
        prompt="make the background red",
        height=SIZE,
        width=SIZE,
        max_area=SIZE * SIZE,
        _auto_resize=False,
        num_inference_steps=20,
        max_sequence_length=MAX_TOKENS,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert edited.size == (SIZE, SIZE)


def test_object_coverage_marks_the_tokens_the_object_covers() -> None:
    from training.train import object_coverage
    from training.vae import to_tensor

    cover = object_coverage(to_tensor([render(Scene("square", "red", "top left", "large", "white"))]))[0]
    assert cover.shape == (64,)  # 8x8 tokens of 16x16 pixels, row-major as FLUX packs them
    grid = cover.reshape(8, 8)
    assert grid[:3, :3].sum() > 0 and grid[3:].sum() == 0 and grid[:, 3:].sum() == 0
    # A large square's bounding box is 2 * 19 pixels wide (plus its antialiased edge): its area, in tokens.
    assert abs(cover.sum().item() - (2 * 19) ** 2 / 256) < 0.5


@needs_weights
def test_training_can_start_from_the_exported_weights() -> None:
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel, T5TokenizerFast

    from training.model import build_modules, load_pipeline_weights

    clip_tok, t5_tok = build_tokenizers()
    modules = build_modules(clip_tok, t5_tok)
    load_pipeline_weights(modules, BUNDLED_WEIGHTS, clip_tok, t5_tok)
    shipped = FluxTransformer2DModel.from_pretrained(str(BUNDLED_WEIGHTS / "transformer")).state_dict()
    for name, tensor in modules["transformer"].state_dict().items():
        assert torch.equal(tensor, shipped[name]), name
    # Token embeddings follow their token's text, whatever id it has in either vocabulary.
    old_tok = T5TokenizerFast.from_pretrained(str(BUNDLED_WEIGHTS / "tokenizer_2"))
    old = (
        T5EncoderModel.from_pretrained(str(BUNDLED_WEIGHTS / "text_encoder_2")).get_input_embeddings().weight
    )
    new = modules["t5"].get_input_embeddings().weight
    for piece in ("▁red", "▁circle", "▁background"):
        assert torch.equal(
            new[t5_tok.convert_tokens_to_ids(piece)], old[old_tok.convert_tokens_to_ids(piece)]
        )


def test_a_wider_vae_keeps_the_latent_grid_the_transformer_expects() -> None:
    from training.model import LATENT_CHANNELS, build_vae

    vae = build_vae((16, 32, 64, 64))
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, SIZE, SIZE)).latent_dist.mode()
    assert z.shape == (1, LATENT_CHANNELS, SIZE // 8, SIZE // 8)
    assert tuple(vae.config.block_out_channels) == (16, 32, 64, 64)


def test_the_exported_vocabulary_knows_synonyms_and_still_reports_other_words(tmp_path: Path) -> None:
    from fluxserve.engines.vocabulary import vocabulary_note
    from training.export import write_vocabulary

    trained, retokenized = tmp_path / "trained", tmp_path / "retokenized"
    trained.mkdir(), retokenized.mkdir()
    write_vocabulary(trained)
    write_vocabulary(retokenized, frozenset(w for w in vocabulary() if w != "and"))
    assert vocabulary_note(trained, "One scarlet dot in the centre, and a box on a violet backdrop") == {}
    note = vocabulary_note(trained, "a purple giraffe in the center")
    assert note["unknown_words"] == ["giraffe"] and "'giraffe'" in note["note"]
    # A folder re-exported without training learned no new word: "and" is reported there.
    assert vocabulary_note(retokenized, "a red dot and a blue box")["unknown_words"] == ["and"]


def test_captions_follow_the_chosen_style_and_the_readers_share() -> None:
    from training.scenes import CAPTION_TEMPLATES, POSITIONS, Scene, canonical_caption
    from training.train import captioner

    def v1_template(text: str) -> bool:
        return any(re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)), text) for t in CAPTION_TEMPLATES)

    scenes = [Scene("star", "red", place, "small", "blue") for place in POSITIONS] * 20
    rng = np.random.default_rng(0)
    reader = captioner("templates", 1.0)
    assert all(reader(s, rng) in (canonical_caption(s), canonical_caption(s, sized=False)) for s in scenes)
    assert all(v1_template(captioner("templates", 0.0)(s, rng)) for s in scenes)
    assert not all(v1_template(captioner("grammar", 0.0)(s, rng)) for s in scenes)


def test_pale_objects_weigh_more_than_vivid_ones_in_both_losses() -> None:
    """``--contrast-ref``: a light blue star on white (the pair the decoder blurred most) is learnt as
    closely as a black one: the same error on its pixels costs more, in the decoder's and the
    transformer's loss alike."""
    from training.train import scene_contrast_factors
    from training.vae import to_tensor, weighted_loss

    pale, vivid = (
        Scene("star", "light blue", "center", "large", "white"),
        Scene("star", "black", "center", "large", "white"),
    )
    factors = scene_contrast_factors([pale, vivid], 3.0)
    assert factors[0] > 2 > 1 > factors[1]  # the pale pair weighs more than the reference, black less
    costs = []
    for scene in (pale, vivid):
        x = to_tensor([render(scene)])
        off = x.clone()
        off[:, :, 60:68, 60:68] += 0.2  # the same error, in the middle of the object
        costs.append(weighted_loss(off, x, contrast_ref=3.0).item() / weighted_loss(off, x).item())
    assert costs[0] > 2 * costs[1]


def test_hard_colour_pairs_are_drawn_by_their_weight_for_half_a_batch() -> None:
    import numpy as np

    from training.vae import PAIRS, draw_scenes

    weights = np.zeros(len(PAIRS))
    weights[PAIRS.index(("light blue", "white"))] = 1.0
    scenes = draw_scenes(np.random.default_rng(0), 40, pair_weights=weights)
    assert all((s.color, s.background) == ("light blue", "white") for s in scenes[::2])
    assert sum((s.color, s.background) == ("light blue", "white") for s in scenes[1::2]) < 5


def test_oversampling_boosts_shapes_and_colour_pairs_and_names_a_wrong_key() -> None:
    """``--oversample star=3 "light blue/white=5"``: the boosts multiply, other scenes keep weight 1, and a
    key that is neither a shape nor a colour on a background is refused by name."""
    from training.train import scene_weights

    scenes = [
        Scene("star", "light blue", "left", "large", "white"),
        Scene("star", "white", "left", "large", "light blue"),
        Scene("circle", "light blue", "left", "large", "white"),
        Scene("circle", "red", "left", "large", "white"),
    ]
    w = scene_weights(scenes, {"star": 3.0, "light blue/white": 5.0})
    assert w is not None
    assert np.allclose(w / w[3], [15, 3, 5, 1])
    assert scene_weights(scenes, {}) is None
    with pytest.raises(ValueError, match="'stars'"):
        scene_weights(scenes, {"stars": 2.0})
    with pytest.raises(ValueError, match="'red/red'"):
        scene_weights(scenes, {"red/red": 2.0})
