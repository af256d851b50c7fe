"""The toy world: deterministic pictures and captions, style folders without held-out content, and the committed
classifier's accuracy on fresh procedural pictures."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from stylelora.toy import world as toyworld
from stylelora.toy.world import HELD_OUT_PAIRS, STYLES, Scene, render


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_pictures_and_captions(tmp_path):
    a, b = toyworld.scenes(20, seed=3), toyworld.scenes(20, seed=3)
    assert a == b and a != toyworld.scenes(20, seed=4)
    for scene in a[:4]:
        assert np.array_equal(np.asarray(render(scene, STYLES["halftone"])), np.asarray(render(scene, STYLES["halftone"])))
    toyworld.write_style_folder(tmp_path / "x", "outline", n=6, seed=1)
    toyworld.write_style_folder(tmp_path / "y", "outline", n=6, seed=1)
    assert _digest(tmp_path / "x") == _digest(tmp_path / "y")


def test_caption_names_the_content():
    scene = Scene("circle", "red", "small", "top left", "black")
    assert scene.caption == "a small red circle on a black background, top left"
    assert toyworld.captioned(scene, "htone") == "a small red circle on a black background, top left, htone"
    assert all(len(toyworld.captioned(s, "inkline")) + 2 <= 77 for s in toyworld.scenes(200, 0))  # fits the tokenizer


def test_picture_shows_the_scene():
    scene = Scene("square", "blue", "large", "top left", "white")
    arr = np.asarray(render(scene, size=128)).astype(int)
    cx, cy = (int(v * 128) for v in toyworld.POSITIONS["top left"])
    assert np.abs(arr[cy, cx] - toyworld.COLOURS["blue"]).max() < 3
    assert np.abs(arr[120, 120] - toyworld.BACKGROUNDS["white"]).max() < 3
    assert render(scene, size=64).size == (64, 64)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_each_style_changes_the_picture(style):
    scene = Scene("circle", "green", "large", "in the center", "gray")
    assert not np.array_equal(np.asarray(render(scene)), np.asarray(render(scene, STYLES[style])))


def test_style_folders_never_show_held_out_pairs(tmp_path):
    folder = toyworld.write_style_folder(tmp_path / "s", "stripes", n=18, seed=0)
    captions = [p.read_text() for p in sorted(folder.glob("*.txt"))]
    assert len(captions) == 18 and len(list(folder.glob("*.png"))) == 18
    assert all(c.startswith("a ") and c.strip().endswith(", {trigger}") for c in captions)
    for shape, colour in HELD_OUT_PAIRS:
        assert not any(f" {colour} {shape} " in c for c in captions)
    shown = {(s, c) for cap in captions for s in toyworld.SHAPES for c in toyworld.COLOURS if f" {c} {s} " in cap}
    assert {s for s, _ in shown} == set(toyworld.SHAPES) and {c for _, c in shown} == set(toyworld.COLOURS)
    for scene in toyworld.held_out_scenes(10):
        assert (scene.shape, scene.colour) in HELD_OUT_PAIRS


def test_style_folders_are_balanced(tmp_path):
    """Every background, size and position comes round about equally often, whatever the seed."""
    for seed in (0, 1):
        scenes = toyworld.balanced_scenes(24, random.Random(seed))
        for attr, values in (("background", toyworld.BACKGROUNDS), ("size", toyworld.SIZES)):
            counts = [sum(getattr(s, attr) == v for s in scenes) for v in values]
            assert max(counts) - min(counts) <= 1, (attr, counts)
        assert {(s.shape, s.colour) for s in scenes} == set(toyworld.STYLE_PAIRS)
    plain = toyworld.write_plain_folder(tmp_path / "p", n=6)
    assert all(", " in c and not c.strip().endswith("{trigger}") for c in (f.read_text() for f in plain.glob("*.txt")))


def test_pretraining_captions_name_the_look_families():
    scene = Scene("circle", "red", "small", "top left", "black")
    assert toyworld.described(scene) == scene.caption
    look = toyworld.STYLES["halftone"] | toyworld.STYLES["pastel"]
    assert toyworld.described(scene, look) == scene.caption + ", dotted, faded"
    assert {"dotted", "striped", "outlined", "faded"} <= set(toyworld.vocabulary())
    rng = random.Random(0)
    counts = [len(toyworld.look_words(toyworld.pretraining_look(rng))) for _ in range(2000)]
    assert abs(counts.count(0) / 2000 - 0.45) < 0.04 and max(counts) == 2
    for name, style in STYLES.items():  # each style is one member of one family
        assert len(toyworld.look_words(style)) == 1, name


def test_random_looks_vary():
    rng = random.Random(0)
    looks = {toyworld.random_look(rng) for _ in range(50)}
    assert len(looks) > 30  # plain ones repeat; textured ones never do


def test_committed_classifier_reads_fresh_pictures():
    """Stated accuracy on held-out procedural pictures (seeds the classifier never trained on). Measured at
    training time with the committed weights (256 pictures): clean shape 0.98 / colour 1.00 / all four style
    labels 0.97; through the tiny base's VAE 0.98 / 0.98 / 0.96."""
    from stylelora.toy import classifiers

    model = classifiers.load_classifier()
    acc = classifiers.evaluate(model, 192, seed=1234)
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.95, acc
    assert acc["styles"] >= 0.9 and min(acc[s] for s in STYLES) >= 0.9, acc
    noisy = classifiers.evaluate(model, 128, seed=4321, augment=True)  # blurred / noised like generated pictures
    assert noisy["shape"] >= 0.9 and noisy["colour"] >= 0.9 and noisy["styles"] >= 0.85, noisy


def test_committed_classifier_reads_the_bases_vae_round_trips():
    """Pictures as the tiny base's decoder draws them (the sharpest a generated picture can be)."""
    from stylelora.toy import classifiers
    from stylelora.models import build_toy_components

    vae = build_toy_components()["vae"].eval()
    roundtrip = classifiers.vae_roundtrip(vae)
    acc = classifiers.evaluate(classifiers.load_classifier(), 128, seed=999, roundtrip=roundtrip)
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.9 and acc["styles"] >= 0.85, acc
    assert min(acc[s] for s in STYLES) >= 0.9, acc


def test_committed_classifier_tells_a_style_from_the_rest_of_its_family():
    """Fidelity means *this* style: other members of its family (finer/coarser dots, stripes at another angle,
    thin ink, a light wash) are not called it. At training time, through the VAE: recall 0.98-1.00, other
    members called the style 0-14 % (outline the weakest)."""
    from stylelora.toy import classifiers
    from stylelora.models import build_toy_components

    vae = build_toy_components()["vae"].eval()
    per = classifiers.evaluate_styles(classifiers.load_classifier(), 48, seed=77,
                                      roundtrip=classifiers.vae_roundtrip(vae))
    assert all(r["recall"] >= 0.9 for r in per.values()), per
    assert all(r["other"] <= 0.25 for r in per.values()), per
