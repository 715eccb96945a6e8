"""The scene generator, captions, split and pixel scorer behind the bundled model's evaluation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from training.scenes import (
    COLOR_NAMES,
    POSITIONS,
    SHAPES,
    Scene,
    all_scenes,
    all_triples,
    analyse,
    caption,
    eval_edits,
    eval_prompts,
    heldout_triples,
    make_edit,
    render,
    score,
    vocabulary,
)


def test_world_is_as_large_as_the_issue_asks() -> None:
    assert len(SHAPES) >= 5 and len(COLOR_NAMES) >= 8 and len(POSITIONS) == 9


@pytest.mark.parametrize("jitter", [0, 5])
def test_scorer_reads_back_every_attribute_of_clean_renders(jitter: int) -> None:
    rng = np.random.default_rng(0)
    scenes = list(all_scenes())
    for i in rng.choice(len(scenes), 150, replace=False):
        scene = replace(scenes[i], jitter=jitter)
        assert all(score(render(scene), scene).values()), (scene, analyse(render(scene)))


def test_scorer_works_at_the_api_size_and_after_lanczos_resize() -> None:
    scene = Scene("heart", "pink", "bottom left", "small", "blue")
    big = render(scene).resize((256, 256), Image.Resampling.LANCZOS)
    assert all(score(big, scene).values())


def test_scorer_rejects_wrong_images() -> None:
    scene = Scene("star", "red", "top left", "large", "white")
    assert score(Image.new("RGB", (128, 128), (245, 245, 245)), scene) == {
        "background": True,
        "color": False,
        "position": False,
        "shape": False,
        "size": False,
    }
    moved = render(replace(scene, position="bottom right", shape="circle"))
    r = score(moved, scene)
    assert r["color"] and not r["position"] and not r["shape"]


def test_captions_vary_and_name_every_attribute() -> None:
    rng = np.random.default_rng(1)
    scene = Scene("triangle", "light blue", "top right", "small", "black")
    texts = {caption(scene, rng) for _ in range(40)}
    assert len(texts) > 10
    for t in texts:
        assert "triangle" in t and "light blue" in t and "black" in t


def test_every_caption_word_is_in_the_vocabulary() -> None:
    rng = np.random.default_rng(2)
    vocab = set(vocabulary())
    scenes = list(all_scenes())
    for i in rng.choice(len(scenes), 200):
        src = scenes[i]
        texts = [caption(src, rng)] + [
            make_edit(src, k, rng).instruction for k in ("recolor", "background", "move")
        ]
        for t in texts:
            for w in t.replace(",", " , ").replace(";", " ; ").replace(":", " : ").split():
                assert w in vocab, (w, t)


def test_edits_change_only_what_they_say() -> None:
    rng = np.random.default_rng(3)
    src = Scene("square", "green", "center", "large", "yellow")
    e = make_edit(src, "recolor", rng, new="purple")
    assert e.target == replace(src, color="purple") and "purple" in e.instruction
    e = make_edit(src, "background", rng, new="black")
    assert e.target == replace(src, background="black")
    e = make_edit(src, "move", rng)
    assert e.target.position != src.position and e.target.color == src.color


def test_heldout_split_is_fixed_and_evaluation_uses_only_heldout_triples() -> None:
    held = heldout_triples()
    assert held == heldout_triples() and 0 < len(held) < len(all_triples()) // 5
    # Every single attribute value still occurs in training, only the combinations are new.
    train = set(all_triples()) - held
    assert {s for s, _, _ in train} == set(SHAPES) and {p for _, _, p in train} == set(POSITIONS)
    prompts = eval_prompts(200)
    assert len(prompts) == 200 and all(s.triple in held for s, _ in prompts)
    assert prompts == eval_prompts(200)
    assert all(e.target.triple in held and e.kind == "recolor" for e in eval_edits(50))
    moves = eval_edits(50, kind="move")
    assert all(e.target.triple in held and e.kind == "move" for e in moves)
    assert all(e.source.position != e.target.position for e in moves)
    assert all((e.source.shape, e.source.color) == (e.target.shape, e.target.color) for e in moves)
    backgrounds = eval_edits(50, kind="background")
    assert all(e.source.triple in held and e.target.triple == e.source.triple for e in backgrounds)
    assert all(e.source.background != e.target.background != e.target.color for e in backgrounds)
    with pytest.raises(ValueError, match="kind"):
        eval_edits(5, kind="add")
