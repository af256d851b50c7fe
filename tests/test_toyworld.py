"""The toy world: deterministic pictures and captions, style folders without held-out content, and the committed
classifier's accuracy on fresh procedural pictures."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from stylelora import toyworld
from stylelora.toyworld import HELD_OUT_PAIRS, STYLES, Scene, render


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


def test_random_looks_vary():
    rng = random.Random(0)
    looks = {toyworld.random_look(rng) for _ in range(50)}
    assert len(looks) > 30  # plain ones repeat; textured ones never do


def test_committed_classifier_reads_fresh_pictures():
    """Stated accuracy on held-out procedural pictures (seeds the classifier never trained on). Measured with the
    committed weights: clean shape 1.00 / colour 0.99 / all four style labels 0.90 (halftone the weakest, 0.91);
    blurred+noised 1.00 / 0.98 / 0.95; through the tiny base's VAE 0.97 / 0.91 / 0.78 (halftone 0.83)."""
    from stylelora import classifiers

    model = classifiers.load_classifier()
    acc = classifiers.evaluate(model, 192, seed=1234)
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.95, acc
    assert acc["styles"] >= 0.85 and min(acc[s] for s in STYLES) >= 0.85, acc
    noisy = classifiers.evaluate(model, 128, seed=4321, augment=True)  # blurred / noised like generated pictures
    assert noisy["shape"] >= 0.9 and noisy["colour"] >= 0.9 and noisy["styles"] >= 0.85, noisy


def test_committed_classifier_reads_the_bases_vae_round_trips():
    """Pictures as the tiny base's decoder draws them (the sharpest a generated picture can be)."""
    from stylelora import classifiers
    from stylelora.models import build_toy_components

    vae = build_toy_components()["vae"].eval()
    acc = classifiers.evaluate(classifiers.load_classifier(), 128, seed=999, roundtrip=classifiers.vae_roundtrip(vae))
    assert acc["shape"] >= 0.9 and acc["colour"] >= 0.85 and acc["styles"] >= 0.7, acc
    assert acc["stripes"] >= 0.9 and acc["pastel"] >= 0.9 and acc["halftone"] >= 0.75, acc
