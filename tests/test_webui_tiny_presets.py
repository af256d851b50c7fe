"""The web UI's presets on the pretrained toy base ``tiny``: the page shows the tiny-scaled numbers it trains with,
and a preset run trains beside the toy world's plain pictures (``reg_folder = "toy:plain"``, a folder under
$STYLELORA_HOME that is outside every training root)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("gradio", reason="gradio is not installed")


def test_preset_labels_and_info_follow_the_base():
    from stylelora.presets import TINY_STEPS_RANK, TOY, WEBUI
    from stylelora.webui.app import preset_choices, preset_info

    tiny = dict((k, label) for label, k in preset_choices("tiny"))
    real = dict((k, label) for label, k in preset_choices("tiny-random"))
    assert list(tiny) == list(real) == list(WEBUI)
    for key, (steps, rank) in TINY_STEPS_RANK.items():
        if key not in WEBUI:
            continue
        lr = TOY.overrides["lr"]
        assert tiny[key] == f"{key}: {steps} steps · rank {rank} · lr {lr:g}"
        assert preset_info(key, "tiny").startswith(f"{steps} steps, rank {rank}, learning rate {lr:g}: ")
        assert "scaled for the 64 px tiny base" in preset_info(key, "tiny")
        o = WEBUI[key].overrides  # any other base: the real-base recipe as written
        assert real[key] == f"{key}: {o['steps']} steps · rank {o['rank']} · lr {o['lr']:g}"
        assert preset_info(key, "tiny-random") == WEBUI[key].describe()


def test_quick_preset_on_tiny_trains_with_the_plain_pictures(tmp_path):
    """Failed before the fix at step 0: 'folder .../toy-plain-64px is a link to a place outside the allowed
    folders' (the run's scan is confined to the training roots, and the built-in set lives elsewhere)."""
    from stylelora.models import load_base
    from stylelora.toy.world import plain_folder, write_style_folder
    from stylelora.webui import Studio, TrainRequest

    write_style_folder(tmp_path / "sets" / "stripes", "stripes", n=4)
    studio = Studio(load_base("tiny"), tmp_path / "loras", [tmp_path / "sets"], work_dir=tmp_path / "work")
    try:
        studio.start_training(TrainRequest(name="stripes", folder="stripes", trigger="strpz", preset="quick",
                                           steps=2, resolution=64, sample_every=0))
        deadline = time.time() + 120
        while studio.job.running and time.time() < deadline:
            time.sleep(0.2)
        s = studio.training_status()
        assert s["status"] == "done", s["message"]
        assert "reg_folder='toy:plain'" in s["recipe"]
        n_plain = len(list(plain_folder().glob("*.png")))
        assert n_plain == 24 and f"{n_plain} regularization" in s["dataset"], s["dataset"]
        assert "stripes" in studio.adapters()
    finally:
        studio.close()


def test_insert_triggers_after_the_prompt_for_the_toy_base():
    """The toy base's text encoder reads a word in front as part of the content (measured: "strpz, <held-out
    prompt>" drew stripes on the bare base in 8 of 12 pictures), so on tiny the page inserts triggers after it."""
    from stylelora.webui.handlers import insert_triggers

    caption = "a small red circle on a white background, in the center"
    assert insert_triggers(caption, ["strpz"], at_end=True) == f"{caption}, strpz"
    assert insert_triggers(caption, ["strpz"]) == f"strpz, {caption}"  # any other base: in front, as before
    assert insert_triggers(f"{caption}, STRPZ", ["strpz, ink"], at_end=True) == f"{caption}, STRPZ, ink"
    assert insert_triggers("", ["strpz"], at_end=True) == "strpz"
