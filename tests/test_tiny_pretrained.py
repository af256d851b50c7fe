"""The committed pretrained ``tiny`` base: it ships, loads as an SD1 pipeline, and draws what the prompt says."""

from __future__ import annotations

import pytest
import torch

from stylelora.toy import classifiers
from stylelora.models import TINY_VERSION, TOY_WEIGHTS, build_toy_components, detect_family, tiny_path

# prompt -> (shape, colour) the classifier must read off the picture (fixed seeds, 64 px, 20 steps)
PROMPTS = {
    "a large red circle on a white background, in the center": ("circle", "red"),
    "a large blue square on a black background, in the center": ("square", "blue"),
    "a large yellow triangle on a gray background, in the center": ("triangle", "yellow"),
    "a large green square on a white background, top left": ("square", "green"),
}


@pytest.fixture(scope="module")
def pretrained_base():
    from stylelora.models import load_base

    return load_base("tiny")


def test_caption_words_are_single_tokens(pretrained_base):
    tok = pretrained_base.pipe.tokenizer
    ids = tok("a small purple triangle on a gray background, bottom left").input_ids
    assert len(ids) == 2 + 11  # start, 10 words + comma, end
    assert len(tok("htone").input_ids) > 3  # other words (trigger words) still work, byte by byte
    # the look-family words are single tokens, except "striped" (5 pieces; a known gap documented in
    # models.word_merges, kept because the committed base was trained with those ids)
    assert len(tok("dotted, outlined, faded").input_ids) == 2 + 5
    assert len(tok("striped").input_ids) == 2 + 5
    assert pretrained_base.pipe.text_encoder.config.vocab_size == len(tok)


def test_weights_are_committed_and_small():
    assert TOY_WEIGHTS.exists(), "run examples/pretrain_tiny_base.py (see stylelora/assets/tiny/README.md)"
    assert TOY_WEIGHTS.stat().st_size <= 25 * 1024 * 1024
    assert classifiers.CLASSIFIER_WEIGHTS.exists()


def test_pretrained_differs_from_random_builder():
    pre, rnd = build_toy_components(), build_toy_components(pretrained=False)
    assert pre["vae"].config.scaling_factor != rnd["vae"].config.scaling_factor
    a, b = pre["unet"].conv_in.weight, rnd["unet"].conv_in.weight
    assert a.shape == b.shape and not torch.equal(a, b)
    again = build_toy_components(pretrained=False)["unet"].conv_in.weight
    assert torch.equal(b, again)  # the random builder stays deterministic for tests that want it


def test_pretrained_base_is_sd1_at_64px(pretrained_base):
    pipe = pretrained_base.pipe
    assert detect_family(pipe).key == "sd1" and pretrained_base.family.key == "sd1"
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert tiny_path("tiny").name.startswith(f"tiny-v{TINY_VERSION}-") and TINY_VERSION == "3"
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8


@pytest.fixture(scope="module")
def drawings(pretrained_base):
    pipe = pretrained_base.pipe
    pipe.set_progress_bar_config(disable=True)
    prompts = list(PROMPTS)
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, height=64, width=64,
                      generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    return dict(zip(prompts, images))


def test_base_draws_what_the_prompt_says(drawings):
    model = classifiers.load_classifier()
    labels = classifiers.classify(model, list(drawings.values()))
    got = {p: (lab["shape"], lab["colour"]) for p, lab in zip(drawings, labels)}
    assert got == PROMPTS
    # the base draws plain pictures; its soft edges can look like an outline to the classifier now and then
    assert sum(bool(lab["styles"]) for lab in labels) <= 1, labels


def test_default_generation_is_64px(pretrained_base):
    pipe = pretrained_base.pipe
    image = pipe("a small purple circle on a white background, top right", num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_missing_weights_file_gives_a_clear_error(monkeypatch, tmp_path):
    from stylelora import models
    from stylelora.errors import ModelError

    monkeypatch.setattr(models, "TOY_WEIGHTS", tmp_path / "gone.safetensors")
    with pytest.raises(ModelError, match=r"gone\.safetensors is missing.*pretrain_tiny_base\.py"):
        models.build_toy_components()


def test_committed_tokenizer_is_the_toy_vocabulary_and_fits_the_text_encoder(tmp_path):
    from transformers import CLIPTokenizer

    from stylelora.models import TOY_TOKENIZER, build_toy_components, word_merges, write_tiny_tokenizer
    from stylelora.toy.world import vocabulary

    # the committed files are exactly what the writer makes from the toy world's words (nothing hand-edited)
    write_tiny_tokenizer(tmp_path / "tok", vocabulary())
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (TOY_TOKENIZER / name).read_bytes(), name
    tok = CLIPTokenizer.from_pretrained(TOY_TOKENIZER)
    assert len(tok) == 514 + len(word_merges(vocabulary()))
    assert len(tok) == build_toy_components(pretrained=False)["text_encoder"].config.vocab_size
    for word in vocabulary():  # every caption word is one token, even where words share letters ("red", "green")
        if word != "striped":  # the one documented exception, see models.word_merges
            assert len(tok(word).input_ids) == 3, word


def test_loading_the_tiny_base_never_imports_the_toy_world():
    import subprocess
    import sys

    code = ("import sys; from stylelora.models import build_toy_components; build_toy_components(); "
            "bad = [m for m in sys.modules if m.startswith(('stylelora.toy', 'stylelora.webui'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
