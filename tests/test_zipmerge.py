"""ZipLoRA merge (``merge --method zip``): coefficients at 1 are the exact merge bit for bit, the written file's ΔW
is Σ c_i·ΔW_i·diag(m_i) with the learnt coefficients (a dense check), a 3-step run on tiny-random writes a file our
Blender and diffusers load alike, the similarity penalty pulls the coefficient vectors apart, and bad input is a
clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_style_images, ours_and_diffusers
from safetensors import safe_open
from test_blend import random_adapter

from stylelora.cli import main
from stylelora.adapter import TokenEmbedding
from stylelora.errors import ConfigError
from stylelora.formats import load_adapter, save_adapter
from stylelora.merge import Source, merge
from stylelora.models import load_base
from stylelora.zipmerge import ZipOptions, similarity, zip_merge

RES = 64  # tiny training images: the merge learns on them


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two random adapters on tiny-random (ranks 4 and 2, UNet and text encoder), saved, with their own images;
    the first records its folder in stylelora metadata, the second only in ``--data``."""
    tmp = tmp_path_factory.mktemp("zip")
    base = load_base("tiny-random")
    folders = [make_style_images(tmp / "ink", n=2, size=(RES, RES), seed=1),
               make_style_images(tmp / "wash", n=2, size=(RES, RES), seed=2)]
    a = random_adapter(base.pipe, "ink", 4, 1, std=0.1)
    b = random_adapter(base.pipe, "wash", 2, 2, std=0.1, alpha=1.0)
    # the first has a learnt trigger word (2 tokens): its prompts need the tokens in the tokenizer while it learns
    width = base.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    a.embeddings["inky"] = TokenEmbedding("inky", {"text_encoder": torch.randn(2, width) * 0.01})
    a.metadata["stylelora.config"] = json.dumps({"data": {"folder": str(folders[0]), "trigger": "inky",
                                                          "resolution": RES, "bucket_step": 64}})
    b.metadata["modelspec.trigger_phrase"] = "washy"
    files = [save_adapter(a, tmp / "ink.safetensors", pipe=base.pipe),
             save_adapter(b, tmp / "wash.safetensors", pipe=base.pipe)]
    return {"tmp": tmp, "base": base, "files": files, "folders": folders}


def sources(setup, weights=(0.7, 1.2)):
    return [Source(load_adapter(f, pipe=setup["base"].pipe), w, w, origin=str(f))
            for f, w in zip(setup["files"], weights)]


def options(setup, **kw):
    return ZipOptions(data={"wash.safetensors": str(setup["folders"][1])}, **kw)


def test_coefficients_at_one_equal_the_exact_merge(setup):
    src = sources(setup)
    zipped = zip_merge(src, setup["base"].pipe, options=options(setup, steps=0))
    exact = merge(src).adapter
    got = zipped.merge.adapter
    assert set(got.modules) == set(exact.modules) == {"unet", "text_encoder"}
    for comp, mods in exact.modules.items():
        assert set(got.modules[comp]) == set(mods)
        for path, m in mods.items():
            z = got.modules[comp][path]
            assert torch.equal(z.down, m.down) and torch.equal(z.up, m.up) and z.alpha == m.alpha, path
    assert all(torch.equal(v, torch.ones_like(v)) for c in zipped.coefficients.values() for v in c.values())
    torch.testing.assert_close(got.embeddings["inky"].vectors["text_encoder"],
                               src[0].adapter.embeddings["inky"].vectors["text_encoder"], rtol=0, atol=0)
    # the base is given back as it was: no hooks left, the trigger words' tokens out again
    pipe = setup["base"].pipe
    assert "inky" not in pipe.tokenizer.get_vocab()
    assert not any(m._forward_hooks for part in (pipe.unet, pipe.text_encoder) for m in part.modules())
    assert all(p.requires_grad for p in pipe.unet.parameters())


def test_zip_file_is_the_column_scaled_sum(setup):
    src = sources(setup)
    zipped = zip_merge(src, setup["base"].pipe, options=options(setup, steps=3, lr=0.2, lam=1.0))
    moved = max(float((v - 1).abs().max()) for c in zipped.coefficients.values() for v in c.values())
    assert moved > 0.1  # 3 Adam steps of lr 0.2 moved the coefficients
    assert zipped.record["steps"] == 3 and len(zipped.record["last"]["distill"]) == 2
    for comp, mods in zipped.merge.adapter.modules.items():
        for path, z in mods.items():
            want = torch.zeros_like(z.delta(torch.float64).flatten(1))
            for i, s in enumerate(src):
                m = s.adapter.modules[comp][path]
                w = s.unet if comp == "unet" else s.te
                want += w * m.delta(torch.float64).flatten(1) * zipped.coefficients[(comp, path)][i].double()
            torch.testing.assert_close(z.delta(torch.float64).flatten(1), want, rtol=1e-5, atol=1e-7)


def test_penalty_pulls_the_coefficients_apart(setup):
    src = sources(setup)
    before = similarity_of(zip_merge(src, setup["base"].pipe, options=options(setup, steps=0)))
    after = similarity_of(zip_merge(src, setup["base"].pipe, options=options(setup, steps=3, lr=0.05, lam=100.0)))
    assert after < 0.9 * before


def similarity_of(zipped) -> float:
    """Σ over layers of |⟨m_a, m_b⟩| / d, from the returned coefficients (independent of zipmerge.similarity)."""
    total = 0.0
    for c in zipped.coefficients.values():
        if len(c) == 2:
            total += abs(float((c[0].double() * c[1].double()).sum())) / c[0].numel()
    return total


def test_cli_zip_writes_a_loadable_plain_lora(setup, capsys):
    out = setup["tmp"] / "zip.safetensors"
    ink, wash = (str(f) for f in setup["files"])
    assert main(["merge", ink, f"{wash}:0.8", "--method", "zip", "--base", "tiny-random", "--zip-steps", "3",
                 "--data", f"wash.safetensors={setup['folders'][1]}", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "zip step 3/3" in text and "zip: 3 steps" in text
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
        keys = list(f.keys())
    assert md["stylelora_merge"] == "zip" and json.loads(md["stylelora_zip"])["lr"] == 0.01
    assert all(k.startswith(("lora_unet_", "lora_te_", "bundle_emb.inky.")) for k in keys)  # plain kohya keys
    adapter = load_adapter(out, pipe=setup["base"].pipe)
    assert {m.rank for mods in adapter.modules.values() for m in mods.values()} == {6}  # 4 + 2 concatenated
    # diffusers' load_lora_weights refuses the bundled embedding keys (any file with them): compare the pairs
    adapter.embeddings.clear()
    pairs = save_adapter(adapter, setup["tmp"] / "zip-pairs.safetensors", pipe=setup["base"].pipe)
    base = load_base("tiny-random")
    ours, theirs = ours_and_diffusers(pairs, base)
    assert np.abs(theirs - ours).max() <= 2.5 / 255


def test_bad_input_is_a_clear_error(setup, capsys):
    ink, wash = (str(f) for f in setup["files"])
    out = str(setup["tmp"] / "bad.safetensors")
    cases = [
        (["--method", "zip"], "pass --base"),
        (["--method", "zip", "--base", "tiny-random", "--rank", "2"], "--rank"),
        (["--method", "zip", "--base", "tiny-random", "--data", "nofolder"], "expected FILE=FOLDER"),
        (["--data", "wash.safetensors=x"], "add --method zip"),
        (["--method", "zip", "--base", "tiny-random", "--zip-lr", "0"], "--zip-lr must be"),
        # the second source records no folder: its file is named with the fix
        (["--method", "zip", "--base", "tiny-random"], "wash.safetensors: no training images known"),
        (["--method", "zip", "--base", "tiny-random", "--data", "other.safetensors=x"], "no source is"),
    ]
    for extra, message in cases:
        assert main(["merge", ink, wash, "-o", out, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    with pytest.raises(ConfigError, match="two or more"):
        zip_merge(sources(setup)[:1], setup["base"].pipe, options=options(setup, steps=0))
    missing = ZipOptions(data={"wash.safetensors": str(setup["tmp"] / "gone")}, steps=0)
    with pytest.raises(ConfigError, match="gone does not exist"):
        zip_merge(sources(setup), setup["base"].pipe, options=missing)
