"""Pivotal tuning (``--train-tokens N``): the trigger word becomes N learnt tokens trained beside the LoRA.

References are independent of the code under test: the base's own embedding matrix (cloned before training), the
tokenizer as loaded, the ids a CLIP tokenizer gives added tokens (appended after its vocabulary), diffusers'
``maybe_convert_prompt`` expansion, and the adapter file read back with the formats loader.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_style_images
from safetensors.torch import load_file
from test_train import quick_config, straight_and_resumed

from stylelora.config import TrainConfig
from stylelora.errors import ConfigError
from stylelora.formats import load_adapter
from stylelora.models import load_base
from stylelora.training import train

TRIGGER = "zzstyle"


def token_config(style_dir, out, **kw):
    cfg = quick_config(style_dir, out, steps=kw.pop("steps", 3)).replace(train_tokens=2, token_lr=5e-2, **kw)
    return cfg


def snapshot(pipe, te_names=("text_encoder",)):
    out = {}
    for te in te_names:
        tok = getattr(pipe, te.replace("text_encoder", "tokenizer"))
        out[te] = dict(tokenizer=tok, vocab=dict(tok.get_vocab()), length=len(tok),
                       ids=tok(f"{TRIGGER} {TRIGGER}_1, stripes").input_ids,
                       embedding=getattr(pipe, te).get_input_embeddings(),
                       state={k: v.clone() for k, v in getattr(pipe, te).state_dict().items()})
    return out


def assert_given_back(pipe, before):
    for te, b in before.items():
        tok = getattr(pipe, te.replace("text_encoder", "tokenizer"))
        assert tok is b["tokenizer"] and len(tok) == b["length"] and tok.get_vocab() == b["vocab"]
        assert tok(f"{TRIGGER} {TRIGGER}_1, stripes").input_ids == b["ids"]
        enc = getattr(pipe, te)
        assert enc.get_input_embeddings() is b["embedding"]
        state = enc.state_dict()
        assert state.keys() == b["state"].keys(), te
        for k, v in b["state"].items():
            assert torch.equal(state[k], v), f"{te}.{k}"


def test_only_new_rows_train_and_borrowed_base_comes_back(style_dir, tmp_path):
    """Old rows read through the live text encoder stay bit-identical at every step, the new rows move, the
    adapter carries them, and the borrowed base (with text-encoder LoRA too) is given back exactly."""
    base = load_base("tiny-random")
    vocab = len(base.pipe.tokenizer)
    original = base.pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    before = snapshot(base.pipe)
    cfg = token_config(style_dir, tmp_path / "a.safetensors", train_text_encoder=True, token_stop=1.0,
                       caption_dropout=0.3, token_init="stripes")
    seen = []

    def on_step(info):
        emb = info.models["text_encoder"].get_input_embeddings()
        with torch.no_grad():
            old = emb(torch.arange(vocab))  # every old token id, through the module the encoder uses
            new = emb(torch.arange(vocab, vocab + 2)).clone()
        assert torch.equal(old, original), f"old rows changed at step {info.step}"
        seen.append(new)

    out = train(cfg, base=base, on_step=on_step)
    assert_given_back(base.pipe, before)

    # initialisation: the mean of the init word's token embeddings, the same for both tokens
    ids = before["text_encoder"]["tokenizer"]("stripes", add_special_tokens=False).input_ids
    init = original[ids].mean(0).expand(2, -1)
    assert not torch.equal(seen[0], init) and not torch.equal(seen[1], seen[0]) and not torch.equal(seen[2], seen[1])
    adapter = load_adapter(out)
    emb = adapter.embeddings[TRIGGER]
    assert emb.tokens() == [TRIGGER, f"{TRIGGER}_1"] and set(emb.vectors) == {"text_encoder"}
    assert torch.equal(emb.vectors["text_encoder"].float(), seen[-1])
    assert "text_encoder" in adapter.modules  # the text-encoder LoRA is there as well
    assert '"train_tokens": 2' in adapter.metadata["stylelora.config"]


def test_tokens_stop_after_their_share_of_steps(style_dir, tmp_path):
    """--token-stop 0.5 of 4 steps: the rows move in steps 1-2 and are bit-identical after, while the UNet LoRA
    still trains. Without text-encoder LoRA: the encoder trains only through its new rows."""
    cfg = token_config(style_dir, tmp_path / "a.safetensors", steps=4, token_stop=0.5)
    rows, lora = [], []

    def on_step(info):
        rows.append(info.models["text_encoder"].get_input_embeddings().rows.detach().clone())
        unet = info.models["unet"]
        lora.append(next(p for n, p in unet.named_parameters() if "lora_B" in n).detach().clone())

    out = train(cfg, on_step=on_step)
    assert not torch.equal(rows[0], rows[1])
    assert torch.equal(rows[1], rows[2]) and torch.equal(rows[2], rows[3])
    assert not torch.equal(lora[2], lora[3])
    adapter = load_adapter(out)
    assert set(adapter.modules) == {"unet"}
    assert torch.equal(adapter.embeddings[TRIGGER].vectors["text_encoder"].float(), rows[-1])


def test_resume_with_tokens_equals_uninterrupted(style_dir, tmp_path):
    """2 + 2 steps with a cooperative stop end bit-for-bit where 4 straight steps end: LoRA, learnt rows (and their
    optimizer state, which shapes steps 3-4), and the stop that falls after the resume (token_stop 0.75)."""
    def config(name):
        cfg = token_config(style_dir, tmp_path / name / "x.safetensors", steps=4, token_stop=0.75)
        cfg.data.cache_dir = str(tmp_path / "cache")
        return cfg

    straight, resumed = straight_and_resumed(config)
    ta, tb = load_file(str(straight)), load_file(str(resumed))
    assert ta.keys() == tb.keys() and any(k.startswith("bundle_emb.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_trigger_is_required_and_must_be_one_word(style_dir, tmp_path):
    with pytest.raises(ConfigError, match="trigger"):
        quick_config(style_dir, tmp_path / "a.safetensors").replace(train_tokens=2, trigger=None)
    with pytest.raises(ConfigError, match="train_tokens = 2 needs a trigger"):
        TrainConfig.from_dict({"network": {"train_tokens": 2}})
    cfg = quick_config(style_dir, tmp_path / "a.safetensors").replace(train_tokens=2, trigger="two words")
    with pytest.raises(ConfigError, match="one word"):
        train(cfg)
    for bad in (dict(token_stop=0.0), dict(token_lr=0.0), dict(train_tokens=-1)):
        with pytest.raises(ConfigError):
            quick_config(style_dir, tmp_path / "a.safetensors").replace(**bad)


def test_text_cache_kept_for_captions_without_the_trigger(style_dir, tmp_path, monkeypatch):
    """Regularization captions (no trigger) are encoded once, into the cache; in the steps only captions that hold
    the learnt tokens are encoded, one row per style image of the batch."""
    from stylelora.conditioning import TextConditioning

    reg = tmp_path / "reg"
    make_style_images(reg, seed=5, captions=False)
    for i in range(4):
        (reg / f"img{i}.txt").write_text(f"a plain picture {i}", encoding="utf-8")
    base = load_base("tiny-random")
    vocab = len(base.pipe.tokenizer)
    calls = []
    encode = TextConditioning.encode

    def counting(self, encoders, ids):
        calls.append(ids[0].clone())
        return encode(self, encoders, ids)

    monkeypatch.setattr(TextConditioning, "encode", counting)
    cfg = token_config(style_dir, tmp_path / "a.safetensors", steps=4, reg_folder=str(reg))
    steps = []
    train(cfg, base=base, on_step=lambda info: steps.append(info.indices))
    learnt = [bool((c >= vocab).any()) for c in calls]  # learnt tokens have ids after the old vocabulary
    # the cache: the 4 distinct regularization captions, encoded one by one before any step
    cached = [i for i, has in enumerate(learnt) if not has]
    assert len(cached) == 4 and all(calls[i].shape[0] == 1 for i in cached)
    assert max(cached) < learnt.index(True)
    # the steps: every row encoded live holds both learnt tokens (the trigger expanded as diffusers expands it);
    # one row per style item of the batches (the items before the regularization ones), none for the others
    live = [row for c, has in zip(calls, learnt) if has for row in c]
    assert all(((row == vocab).any() and (row == vocab + 1).any()) for row in live)
    style_items = sum(i < 4 for idx in steps for batch in idx for i in batch)
    assert 0 < style_items < sum(len(batch) for idx in steps for batch in idx)
    assert len(live) == style_items


def test_sdxl_both_encoders_get_tokens(style_dir, tmp_path):
    base = load_base("tiny-sdxl")
    tes = ("text_encoder", "text_encoder_2")
    before = snapshot(base.pipe, tes)
    widths = {te: getattr(base.pipe, te).config.hidden_size for te in tes}
    cfg = token_config(style_dir, tmp_path / "xl.safetensors", steps=2, base="tiny-sdxl", token_stop=1.0)
    rows = []
    out = train(cfg, base=base, on_step=lambda info: rows.append(
        {te: info.models[te].get_input_embeddings().rows.detach().clone() for te in tes}))
    assert_given_back(base.pipe, before)
    assert all(not torch.equal(rows[0][te], rows[1][te]) for te in tes)  # both encoders' rows train
    emb = load_adapter(out).embeddings[TRIGGER]
    assert set(emb.vectors) == set(tes)
    for te in tes:
        v = emb.vectors[te]
        assert v.shape == (2, widths[te]) and torch.isfinite(v).all()
        # random init: directions scaled to the vocabulary's mean norm; two Adam steps of lr 5e-2 move each
        # coordinate by at most ~2 * 5e-2, so the norm stays within that times sqrt(width) of it
        mean_norm = before[te]["embedding"].weight.detach().norm(dim=1).mean()
        assert (v.norm(dim=1) - mean_norm).abs().max() <= 2 * 5e-2 * v.shape[1] ** 0.5


def test_multi_process_rows_are_synchronised(style_dir, tmp_path):
    """2 CPU processes (gloo DDP), text encoder without LoRA: both ranks end with the same learnt rows (DDP
    all-reduced their gradients) and one adapter carries them."""
    import os
    import socket
    import subprocess
    import sys

    from test_train import REPO

    out = tmp_path / "mp" / "m.safetensors"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "tests" / "train_worker.py"), "--record", str(tmp_path / "rec"), "--", "train", str(style_dir),
           "-o", str(out), "--base", "tiny-random", "--trigger", TRIGGER, "--resolution", "128", "--rank", "4",
           "--steps", "2", "--batch-size", "1", "--train-tokens", "2", "--token-stop", "1", "--token-lr", "0.05",
           "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    w0, w1 = (load_file(str(tmp_path / "rec" / f"rank-{r}.safetensors")) for r in (0, 1))
    rows = [k for k in w0 if k.endswith("token_embedding.rows")]
    assert len(rows) == 1 and rows[0].startswith("text_encoder.") and w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    emb = load_adapter(out).embeddings[TRIGGER]
    assert torch.equal(emb.vectors["text_encoder"].float(), w0[rows[0]])
