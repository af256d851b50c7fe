"""The committed pretrained ``tiny`` base: it ships, loads as an SD1 pipeline, and draws what the prompt says."""

from __future__ import annotations

import pytest
import torch

from stylelora import classifiers
from stylelora.models import TINY_VERSION, TINY_WEIGHTS, build_tiny_components, detect_family, tiny_path

# prompt -> (shape, colour) the classifier must read off the picture (fixed seeds, 128 px, 20 steps)
PROMPTS = {
    "a large red circle on a white background, in the center": ("circle", "red"),
    "a large blue square on a black background, in the center": ("square", "blue"),
    "a large yellow triangle on a gray background, in the center": ("triangle", "yellow"),
    "a large green square on a white background, top left": ("square", "green"),
}


def test_weights_are_committed_and_small():
    assert TINY_WEIGHTS.exists(), "run examples/pretrain_tiny_base.py (see stylelora/assets/tiny/README.md)"
    assert TINY_WEIGHTS.stat().st_size <= 25 * 1024 * 1024
    assert classifiers.CLASSIFIER_WEIGHTS.exists()


def test_pretrained_differs_from_random_builder():
    pre, rnd = build_tiny_components("sd1"), build_tiny_components("sd1", pretrained=False)
    assert pre["vae"].config.scaling_factor != rnd["vae"].config.scaling_factor
    a, b = pre["unet"].conv_in.weight, rnd["unet"].conv_in.weight
    assert a.shape == b.shape and not torch.equal(a, b)
    again = build_tiny_components("sd1", pretrained=False)["unet"].conv_in.weight
    assert torch.equal(b, again)  # the random builder stays deterministic for tests that want it


def test_tiny_base_is_sd1_at_128px(tiny_base):
    pipe = tiny_base.pipe
    assert detect_family(pipe).key == "sd1" and tiny_base.family.key == "sd1"
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 128
    assert tiny_path("tiny").name == f"tiny-v{TINY_VERSION}" and TINY_VERSION == "2"


@pytest.fixture(scope="module")
def drawings(tiny_base):
    pipe = tiny_base.pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = list(PROMPTS)
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, height=128, width=128,
                      generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    return dict(zip(prompts, images))


def test_base_draws_what_the_prompt_says(drawings):
    model = classifiers.load_classifier()
    labels = classifiers.classify(model, list(drawings.values()))
    got = {p: (lab["shape"], lab["colour"]) for p, lab in zip(drawings, labels)}
    assert got == PROMPTS
    assert all(not lab["styles"] for lab in labels), labels  # the base draws plain pictures


def test_default_generation_is_128px(tiny_base):
    pipe = tiny_base.pipe
    image = pipe("a small purple circle on a white background, top right", num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (128, 128)
