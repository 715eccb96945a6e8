"""The scene generator, captions, split and pixel scorer behind the bundled model's evaluation."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.scenes import (
    CAPTION_TEMPLATES,
    COLOR_NAMES,
    EVAL_CAPTION_TEMPLATES,
    EVAL_PAIR_TEMPLATES,
    PAIR_TEMPLATES,
    POSITIONS,
    SHAPES,
    SIZE,
    SIZE_WORDS,
    Scene,
    all_scenes,
    all_triples,
    analyse,
    canonical_caption,
    caption,
    cell_center,
    default_background,
    edge_excess,
    eval_edits,
    eval_pairs,
    eval_prompts,
    grammar_caption,
    group_caption,
    held_out,
    heldout_triples,
    make_edit,
    normalize_prompt,
    pair_caption,
    random_group,
    random_pair,
    random_scene,
    render,
    render_objects,
    score,
    score_pair,
    vocabulary,
    with_defaults,
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


def words(text: str) -> list[str]:
    return text.replace(",", " , ").replace(";", " ; ").replace(":", " : ").split()


def test_a_caption_leaves_out_only_what_is_the_default() -> None:
    rng = np.random.default_rng(4)
    named = Scene("heart", "orange", "top left", "small", "blue")
    on_default = Scene("heart", "orange", "center", "small", default_background("orange"))
    for _ in range(60):
        assert "blue" in caption(named, rng) and "left" in caption(named, rng)
    texts = {caption(on_default, rng) for _ in range(200)}
    assert "a orange heart" in texts  # no background, no place: white, in the center ("an": a synonym)
    assert any("white" in t for t in texts)
    assert default_background("white") == "black" and default_background("red") == "white"
    shifted = [with_defaults(named, rng, 0.5) for _ in range(100)]
    assert {s.background for s in shifted} == {"blue", "white"}
    assert all(s.position == named.position for s in shifted)


def test_evaluation_phrasings_are_never_trained_and_use_known_words() -> None:
    assert not set(EVAL_CAPTION_TEMPLATES) & set(CAPTION_TEMPLATES)
    assert not set(EVAL_PAIR_TEMPLATES) & set(PAIR_TEMPLATES)
    assert all(held_out(t) for t in EVAL_CAPTION_TEMPLATES + EVAL_PAIR_TEMPLATES)
    assert held_out("{size} {color} {shape}  {where}") and not held_out("a {size} {color} {shape} {where}")
    vocab = set(vocabulary())
    prompts = eval_prompts(200)
    assert any(s.background == default_background(s.color) for s, _ in prompts)
    for _, text in prompts + [(None, t) for _, t in eval_pairs(100)]:
        assert all(w in vocab for w in words(text)), text


def test_two_object_scenes_are_drawn_and_read_back() -> None:
    rng = np.random.default_rng(5)
    held = heldout_triples()
    pairs = eval_pairs(60)
    assert all(a.triple in held and b.triple in held for (a, b), _ in pairs)
    for (a, b), text in pairs:
        assert a.position != b.position and a.color != b.color and a.background == b.background
        assert a.color in text and b.color in text
        assert score_pair(render_objects([a, b]), (a, b)) == {
            "background": True,
            "both": True,
            "shapes": True,
        }
        # one object missing, or the two swapped, is wrong
        assert not score_pair(render(a), (a, b))["both"]
        swapped = (replace(a, position=b.position), replace(b, position=a.position))
        assert not score_pair(render_objects(list(swapped)), (a, b))["both"]
    pair = random_pair(rng, sorted(set(all_triples()) - held))
    assert pair_caption(pair, rng).count(" and ") == 1 or "and" in pair_caption(pair, rng)


@pytest.mark.parametrize("size", [(144, 112), (112, 144), (160, 96), (272, 48)])
def test_non_square_renders_keep_the_grid_and_fit_objects_in_their_cells(size: tuple[int, int]) -> None:
    for scene in (
        Scene("square", "red", "top right", "large", "white"),
        Scene("circle", "blue", "left", "small", "black"),
    ):
        image = render_objects([scene], *size)
        assert image.size == size
        found = analyse(image)
        assert (found.color, found.position, found.background) == (
            scene.color,
            scene.position,
            scene.background,
        )


def test_edge_check_tells_clean_images_from_streaked_ones() -> None:
    from PIL import ImageDraw

    clean = render_objects([Scene("star", "yellow", "center", "large", "blue")], 144, 112)
    assert edge_excess(clean.resize((1024, 768), Image.Resampling.LANCZOS)) < 10
    streaked = clean.copy()
    draw = ImageDraw.Draw(streaked)
    draw.line([(130, 5), (130, 100)], fill=(240, 0, 240))  # v1's line where its 8x8 token grid ended
    draw.point([(40, 108), (70, 109)], fill=(0, 200, 0))
    assert edge_excess(streaked.resize((1024, 768), Image.Resampling.LANCZOS)) > 100
    specks = clean.copy()
    for x in range(10, 130, 24):  # specks along the bottom
        ImageDraw.Draw(specks).rectangle([(x, 107), (x + 3, 110)], fill=(0, 200, 0))
    assert edge_excess(specks) > 100


def test_the_grammar_words_a_scene_many_ways_and_never_as_the_evaluation_does() -> None:
    """Training captions come from the grammar: any order of the parts, every attribute said (the place and
    background only when they are not the default), and never one of the held-out phrasings."""
    from training.scenes import group_template, single_template

    rng = np.random.default_rng(6)
    scene = Scene("star", "pink", "bottom right", "large", "green")
    texts = [grammar_caption(scene, rng) for _ in range(300)]
    assert len(set(texts)) > 150
    for text in texts:
        assert "pink" in text and "star" in text and "green" in text and "right" in text, text
    firsts = {t.split()[0] for t in texts}
    assert {"a", "the", "pink", "green"} <= firsts  # object first, with or without an article, or background
    assert any(t.startswith(("in the", "at the", "on the")) for t in texts)  # place first
    for place in (True, False):
        for background in (True, False):
            for _ in range(300):
                assert not held_out(single_template(rng, place, background))
    for n in (2, 3):
        for background in (True, False):
            for _ in range(300):
                assert not held_out(group_template(rng, n, background))


def test_group_captions_name_each_object_with_its_place() -> None:
    rng = np.random.default_rng(7)
    train = sorted(set(all_triples()) - heldout_triples())
    vocab = set(vocabulary())
    for n in (2, 3):
        for _ in range(100):
            group = random_group(rng, train, n)
            assert len({s.position for s in group}) == n and len({s.color for s in group}) == n
            assert len({s.background for s in group}) == 1 and group[0].background not in {
                s.color for s in group
            }
            text = group_caption(group, rng)
            assert all(w in vocab for w in words(text)), text
            # named in the order given ("blue" not as part of "light blue")
            spots = [re.search(rf"(?<!light )\b{s.color}\b", text) for s in group]
            assert None not in spots, text
            starts = [m.start() for m in spots if m]
            assert starts == sorted(starts), text


def test_the_server_reads_every_held_out_prompt_as_its_scene() -> None:
    """The reader (engines/phrasing.py) over the shipped phrasing.json: each of 400 held-out prompts and of
    v1's template captions becomes the scene's own caption in the phrasing the model reads best."""
    from fluxserve.engines.phrasing import phrasing_of, read
    from fluxserve.engines.registry import BUNDLED_WEIGHTS

    phrasing = phrasing_of(BUNDLED_WEIGHTS)
    assert phrasing is not None
    rng = np.random.default_rng(3)
    prompts = eval_prompts(400) + [
        (scene, caption(scene, rng, CAPTION_TEMPLATES))
        for scene in (with_defaults(random_scene(rng, all_triples()), rng, 0.4) for _ in range(1000))
    ]
    for scene, prompt in prompts:
        words = normalize_prompt(prompt).split()
        said_size = any(word in words for size in SIZE_WORDS.values() for word in size)
        assert read(prompt, phrasing) == canonical_caption(scene, sized=said_size), prompt


def test_the_server_reads_every_held_out_pair_as_its_two_objects() -> None:
    """Each held-out two-object prompt becomes one prompt per object, in order, with its place's centre and
    the pair's background (the engine draws them apart and joins them)."""
    from fluxserve.engines.phrasing import phrasing_of, read_scene
    from fluxserve.engines.registry import BUNDLED_WEIGHTS

    phrasing = phrasing_of(BUNDLED_WEIGHTS)
    assert phrasing is not None
    for pair, prompt in eval_pairs(200):
        parts = read_scene(prompt, phrasing)
        assert parts is not None and len(parts) == 2, prompt
        for part, scene in zip(parts, pair, strict=True):
            x, y = cell_center(scene.position)
            assert part.centre == pytest.approx((x / SIZE, y / SIZE)), prompt
            assert f"{scene.color} {scene.shape} {phrasing.places[scene.position]}" in part.prompt, prompt
            assert part.prompt.endswith(f" on a {pair[0].background} background"), prompt


def test_the_shipped_phrasing_is_what_export_writes_from_the_caption_tables(tmp_path: Path) -> None:
    from fluxserve.engines.phrasing import PHRASING_FILE
    from fluxserve.engines.registry import BUNDLED_WEIGHTS
    from training.export import write_phrasing

    write_phrasing(tmp_path)
    assert (tmp_path / PHRASING_FILE).read_text() == (BUNDLED_WEIGHTS / PHRASING_FILE).read_text()
