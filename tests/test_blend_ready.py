"""Training for blending (``--blend-ready P``): a stand-in for another adapter's learnt trigger in the captions.

References are independent of the code under test: the ids a CLIP tokenizer gives added tokens (appended after its
vocabulary, in the order added), diffusers' ``maybe_convert_prompt`` expansion, the base's own embedding matrix
(cloned before training), and the adapter file read back with the formats loader.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_style_images  # noqa: F401 - the style_dir fixture builds on it
from test_train_tokens import TRIGGER, assert_given_back, snapshot, token_config

from stylelora import tokens
from stylelora.errors import ConfigError
from stylelora.formats import load_adapter
from stylelora.models import load_base
from stylelora.training import train


def test_standin_word_expands_to_new_tokens_after_the_trigger():
    base = load_base("tiny-random")
    pipe = base.pipe
    vocab = len(pipe.tokenizer)
    t = tokens.TriggerTokens()
    t.add_tokens(pipe, ["text_encoder"], TRIGGER, 2, standins=2)
    try:
        word = t.standin_word
        assert TRIGGER not in word and word not in TRIGGER  # diffusers expands by str.replace on the prompt
        tok = pipe.tokenizer
        ids = tok(pipe.maybe_convert_prompt(f"a cat, {TRIGGER} {word}", tok), add_special_tokens=False).input_ids
        assert ids[-4:] == [vocab, vocab + 1, vocab + 2, vocab + 3]
        ids = tok(pipe.maybe_convert_prompt(f"{word} {TRIGGER}", tok), add_special_tokens=False).input_ids
        assert ids == [vocab + 2, vocab + 3, vocab, vocab + 1]
    finally:
        t.remove(pipe)
    assert len(pipe.tokenizer) == vocab


def test_standin_goes_right_before_or_after_the_trigger_word_only():
    t = tokens.TriggerTokens()
    t.word, t.n, t.standins = TRIGGER, 2, 2
    w = t.standin_word
    captions = [f"a cat, {TRIGGER}", f"{TRIGGER} art of a dog", "a plain caption", f"{TRIGGER}s are not it", ""] * 80
    out = t.with_standin(captions, 1.0, torch.Generator().manual_seed(0))
    sides = set()
    for before, after in zip(captions, out):
        if not re.search(rf"\b{TRIGGER}\b", before):
            assert after == before
            continue
        if after == before.replace(TRIGGER, f"{w} {TRIGGER}", 1):
            sides.add("before")
        else:
            assert after == before.replace(TRIGGER, f"{TRIGGER} {w}", 1), after
            sides.add("after")
    assert sides == {"before", "after"}
    assert t.with_standin(captions, 0.0, torch.Generator().manual_seed(0)) == captions
    half = t.with_standin([f"x {TRIGGER}"] * 1000, 0.5, torch.Generator().manual_seed(1))
    assert 0.45 < sum(w in c for c in half) / 1000 < 0.55


def test_blend_ready_needs_learnt_tokens(style_dir, tmp_path):
    from test_train import quick_config

    with pytest.raises(ConfigError, match="--train-tokens"):
        quick_config(style_dir, tmp_path / "a.safetensors").replace(blend_ready=0.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        token_config(style_dir, tmp_path / "a.safetensors", blend_ready=1.5)


def test_training_sees_fresh_standins_and_saves_only_the_trigger(style_dir, tmp_path, monkeypatch):
    """The captions carry the stand-in, its vectors are new each step at the vocabulary's mean norm and never
    train; the adapter holds the trigger's 2 learnt rows only, and the base comes back exactly."""
    base = load_base("tiny-random")
    vocab = len(base.pipe.tokenizer)
    table = base.pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    mean_norm = float(table.norm(dim=1).mean())
    before = snapshot(base.pipe)
    seen_captions, seen_vectors = [], []
    original_with, original_redraw = tokens.TriggerTokens.with_standin, tokens.TriggerTokens.redraw_standins

    def redraw(self, gen):
        original_redraw(self, gen)
        module = self.modules["text_encoder"]
        assert not module.standin.requires_grad
        seen_vectors.append(module.standin.clone())

    def with_standin(self, captions, share, gen):
        out = original_with(self, captions, share, gen)
        seen_captions.extend(out)
        return out

    monkeypatch.setattr(tokens.TriggerTokens, "redraw_standins", redraw)
    monkeypatch.setattr(tokens.TriggerTokens, "with_standin", with_standin)
    cfg = token_config(style_dir, tmp_path / "a.safetensors", blend_ready=1.0, train_text_encoder=True, steps=3)
    out = train(cfg, base=base)
    assert_given_back(base.pipe, before)
    assert len(seen_vectors) == 3 and all(v.shape == (2, table.shape[1]) for v in seen_vectors)
    assert not torch.equal(seen_vectors[0], seen_vectors[1])
    for v in seen_vectors:
        assert torch.allclose(v.norm(dim=1), torch.full((2,), mean_norm), rtol=1e-5)
    with_trigger = [c for c in seen_captions if re.search(rf"\b{TRIGGER}\b", c)]
    assert with_trigger and all("standinzq" in c for c in with_trigger)
    adapter = load_adapter(out)
    assert list(adapter.embeddings) == [TRIGGER]
    assert adapter.embeddings[TRIGGER].vectors["text_encoder"].shape == (2, table.shape[1])
    assert len(base.pipe.tokenizer) == vocab

