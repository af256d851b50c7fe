"""Learnt token embeddings in files: kohya (A1111 ``bundle_emb.*``) and PEFT layouts, sidecar embedding files,
diffusers' loaders, convert, merge, inspect and clear errors for bad tensors (issue #15)."""
import json

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from stylelora.adapter import Adapter, LoraModule, TokenEmbedding
from stylelora.cli import main
from stylelora.errors import AdapterError
from stylelora.formats import describe, load_adapter, load_embedding, save_adapter, sidecar_paths
from stylelora.formats.arch import builtin_table
from stylelora.models import Family, load_base
from stylelora.merge import merge

UNET_T = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="session")
def tiny(tiny_base):
    return tiny_base


@pytest.fixture(scope="module")
def tiny_xl():
    return load_base("tiny-sdxl")


def unet_lora(pipe, seed=0, rank=2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"unet": {n: LoraModule(torch.randn(rank, m.in_features, generator=g),
                                   torch.randn(m.out_features, rank, generator=g), 1.0)
                     for n, m in pipe.unet.named_modules()
                     if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in UNET_T)}}


def emb(name, n, widths: dict, seed=0, dtype=torch.float32) -> TokenEmbedding:
    g = torch.Generator().manual_seed(seed)
    return TokenEmbedding(name, {c: torch.randn(n, w, generator=g).to(dtype) for c, w in widths.items()})


def sd1_adapter(pipe, words=("inkwash",), seed=0) -> Adapter:
    embs = {w: emb(w, 2 + i, {"text_encoder": 32}, seed=seed + i) for i, w in enumerate(words)}
    return Adapter(unet_lora(pipe, seed), family="sd1", name="a", embeddings=embs)


def meta() -> dict:  # the file names its tiny base, so it resolves without a pipe
    from stylelora.config import TrainConfig

    return {"stylelora.config": TrainConfig().replace(base="tiny-random").to_json()}


def same_embeddings(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for w in a:
        assert b[w].name == w and sorted(a[w].vectors) == sorted(b[w].vectors)
        for c in a[w].vectors:
            assert b[w].vectors[c].dtype == a[w].vectors[c].dtype and torch.equal(a[w].vectors[c], b[w].vectors[c])


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sd1_round_trip_both_layouts_with_documented_keys(tiny, tmp_path, dtype):
    a = sd1_adapter(tiny.pipe, ("inkwash", "paper"))
    a.embeddings = {w: TokenEmbedding(w, {c: v.to(dtype) for c, v in e.vectors.items()})
                    for w, e in a.embeddings.items()}
    expected = {"kohya": {"bundle_emb.inkwash.string_to_param.*", "bundle_emb.paper.string_to_param.*"},
                "peft": {"stylelora_emb.inkwash.text_encoder", "stylelora_emb.paper.text_encoder"}}
    for fmt, keys in expected.items():
        f = save_adapter(a, tmp_path / f"{fmt}.safetensors", format=fmt, pipe=tiny.pipe, metadata=meta())
        sd = load_file(f)
        assert {k for k in sd if "emb" in k} == keys
        assert torch.equal(sd[sorted(keys)[0]], a.embeddings["inkwash"].vectors["text_encoder"])
        same_embeddings(a.embeddings, load_adapter(f, pipe=tiny.pipe).embeddings)
        same_embeddings(a.embeddings, load_adapter(f).embeddings)  # without a base: the built-in tiny table
        with safe_open(str(f), "pt") as h:
            assert json.loads(h.metadata()["stylelora.embeddings"]) == {"inkwash": 2, "paper": 3}


def sdxl_adapter(words=("inkwash",), n=2, widths=(768, 1280)) -> Adapter:
    """Against the released SDXL architecture (meta-device table): real widths, no weights needed."""
    table = builtin_table("sdxl")
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    shape = table.components["unet"].shapes[path]
    mods = {"unet": {path: LoraModule(torch.randn(2, shape[1]), torch.randn(shape[0], 2), 1.0)}}
    embs = {w: emb(w, n, dict(zip(("text_encoder", "text_encoder_2"), widths)), seed=i) for i, w in enumerate(words)}
    return Adapter(mods, family="sdxl", embeddings=embs)


def test_sdxl_round_trip_clip_l_clip_g(tmp_path):
    a = sdxl_adapter()
    for fmt, keys in (("kohya", {"bundle_emb.inkwash.clip_l": 768, "bundle_emb.inkwash.clip_g": 1280}),
                      ("peft", {"stylelora_emb.inkwash.text_encoder": 768,
                                "stylelora_emb.inkwash.text_encoder_2": 1280})):
        f = save_adapter(a, tmp_path / f"xl-{fmt}.safetensors", format=fmt, family=Family("sdxl"))
        sd = load_file(f)
        assert {k: v.shape[1] for k, v in sd.items() if "emb" in k} == keys
        b = load_adapter(f)
        assert b.family == "sdxl" and b.content_hash() == a.content_hash()
        same_embeddings(a.embeddings, b.embeddings)


def test_hand_written_a1111_bundles_load(tiny, tmp_path):
    """Files from others: A1111's SD1 bundle (a 1-D vector is one token) and an SDXL clip_l/clip_g bundle."""
    lora = load_file(save_adapter(Adapter(unet_lora(tiny.pipe)), tmp_path / "plain.safetensors", pipe=tiny.pipe))
    v = torch.randn(32)
    save_file({**lora, "bundle_emb.hand.string_to_param.*": v}, tmp_path / "sd1.safetensors")
    got = load_adapter(tmp_path / "sd1.safetensors", pipe=tiny.pipe).embeddings
    assert list(got) == ["hand"] and torch.equal(got["hand"].vectors["text_encoder"], v[None])

    xl = load_file(save_adapter(sdxl_adapter(words=()), tmp_path / "xl.safetensors", family=Family("sdxl")))
    l, g = torch.randn(3, 768), torch.randn(3, 1280)
    save_file({**xl, "bundle_emb.hand.clip_l": l, "bundle_emb.hand.clip_g": g}, tmp_path / "xl2.safetensors",
              {"ss_base_model_version": "sdxl_base_v1-0"})
    got = load_adapter(tmp_path / "xl2.safetensors").embeddings["hand"]
    assert torch.equal(got.vectors["text_encoder"], l) and torch.equal(got.vectors["text_encoder_2"], g)
    assert got.tokens() == ["hand", "hand_1", "hand_2"]


# ----------------------------------------------------------------------------------------------- sidecars
def test_sidecar_layout_and_diffusers_load_textual_inversion_sd1(tiny, tmp_path):
    a = sd1_adapter(tiny.pipe)
    f = save_adapter(a, tmp_path / "style.safetensors", pipe=tiny.pipe)
    side = tmp_path / "style_emb.safetensors"
    assert sidecar_paths(f, a.embeddings) == {"inkwash": side}
    with safe_open(str(side), "pt") as h:
        assert list(h.keys()) == ["emb_params"] and h.metadata()["stylelora.token"] == "inkwash"
    vec = a.embeddings["inkwash"].vectors["text_encoder"]
    assert torch.equal(load_file(side)["emb_params"], vec)
    assert torch.equal(load_embedding(side).vectors["text_encoder"], vec) and load_embedding(side).name == "inkwash"

    pipe = load_base("tiny-random").pipe  # a fresh one: diffusers adds tokens to it
    pipe.load_textual_inversion(str(side), token="inkwash")
    ids = pipe.tokenizer.convert_tokens_to_ids(["inkwash", "inkwash_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), vec)
    assert pipe.maybe_convert_prompt("an inkwash cat", pipe.tokenizer) == "an inkwash inkwash_1 cat"


def test_sidecar_sdxl_loads_in_diffusers_and_one_file_per_word(tiny_xl, tmp_path):
    pipe = tiny_xl.pipe
    widths = {c: getattr(pipe, c).get_input_embeddings().weight.shape[1] for c in ("text_encoder", "text_encoder_2")}
    a = Adapter(unet_lora(pipe), family="sdxl",
                embeddings={"ink": emb("ink", 2, widths, 1), "wash": emb("wash", 1, widths, 2)})
    f = save_adapter(a, tmp_path / "xl.safetensors", pipe=pipe)
    paths = sidecar_paths(f, a.embeddings)
    assert paths == {"ink": tmp_path / "xl_ink_emb.safetensors", "wash": tmp_path / "xl_wash_emb.safetensors"}
    sd = load_file(paths["ink"])
    assert sorted(sd) == ["clip_g", "clip_l"]
    for key, comp, tok in (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2")):
        pipe.load_textual_inversion(sd[key], token="ink", text_encoder=getattr(pipe, comp),
                                    tokenizer=getattr(pipe, tok))
        ids = getattr(pipe, tok).convert_tokens_to_ids(["ink", "ink_1"])
        got = getattr(pipe, comp).get_input_embeddings().weight[ids].detach()
        assert torch.equal(got, a.embeddings["ink"].vectors[comp])
    for comp, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):  # leave the base as it was
        pipe.unload_textual_inversion(["ink", "ink_1"], text_encoder=getattr(pipe, comp), tokenizer=getattr(pipe, tok))
    same_embeddings(a.embeddings, {w: load_embedding(p) for w, p in paths.items()})


def test_load_embedding_reads_a_diffusers_learned_embeds_file(tmp_path):
    v = torch.randn(1, 32)
    save_file({"<cat-toy>": v}, tmp_path / "learned_embeds.safetensors")
    e = load_embedding(tmp_path / "learned_embeds.safetensors")
    assert e.name == "<cat-toy>"  # the key is diffusers' token
    e = load_embedding(tmp_path / "learned_embeds.safetensors", name="cattoy")
    assert e.name == "cattoy" and torch.equal(e.vectors["text_encoder"], v)


# --------------------------------------------------------------------------------- diffusers LoRA loading
def test_diffusers_load_lora_weights_peft_file_direct_kohya_file_without_bundle(tiny, tmp_path):
    """diffusers 0.3x/0.4x refuse keys without 'lora' in them: PEFT files (stylelora_emb.*) load as they are;
    kohya files need their bundle_emb.* keys left out (README's recipe)."""
    a = sd1_adapter(tiny.pipe)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    peft_file = save_adapter(a, tmp_path / "p.safetensors", format="peft", pipe=tiny.pipe)
    kohya_file = save_adapter(a, tmp_path / "k.safetensors", pipe=tiny.pipe)
    pipe = load_base("tiny-random").pipe
    pipe.load_lora_weights(str(peft_file), adapter_name="p")
    layer = pipe.unet.get_submodule(path)
    assert torch.equal(layer.lora_A["p"].weight.detach(), a.modules["unet"][path].down)

    pipe = load_base("tiny-random").pipe
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(kohya_file), adapter_name="k")
    sd = {k: v for k, v in load_file(kohya_file).items() if not k.startswith("bundle_emb.")}
    pipe.load_lora_weights(sd, adapter_name="k")
    layer = pipe.unet.get_submodule(path)
    assert torch.equal(layer.lora_A["k"].weight.detach(), a.modules["unet"][path].down)


# ---------------------------------------------------------------------------------- convert, merge, inspect
def test_convert_kohya_peft_kohya_keeps_embeddings_bit_exact(tiny, tmp_path, capsys):
    a = sd1_adapter(tiny.pipe, ("inkwash", "paper"))
    k1 = save_adapter(a, tmp_path / "k1.safetensors", metadata=meta())
    assert main(["convert", str(k1), "--to", "peft", "-o", str(tmp_path / "p.safetensors")]) == 0
    assert "inkwash (2 tokens), paper (3 tokens)" in capsys.readouterr().out
    out = tmp_path / "k2.safetensors"
    assert main(["convert", str(tmp_path / "p.safetensors"), "--to", "kohya", "-o", str(out)]) == 0
    one, two = load_file(k1), load_file(tmp_path / "k2.safetensors")
    assert sorted(one) == sorted(two) and all(torch.equal(one[k], two[k]) for k in one)
    assert (tmp_path / "p_paper_emb.safetensors").is_file() and (tmp_path / "k2_inkwash_emb.safetensors").is_file()


def test_merge_keeps_both_sources_embeddings_clash_and_rename(tiny, tmp_path, capsys):
    a = sd1_adapter(tiny.pipe, ("inkwash",), seed=0)
    b = sd1_adapter(tiny.pipe, ("paper",), seed=5)
    fa, fb = (save_adapter(x, tmp_path / f"{n}.safetensors", pipe=tiny.pipe, metadata=meta())
              for x, n in ((a, "a"), (b, "b")))
    out = tmp_path / "m.safetensors"
    assert main(["merge", f"{fa}:0.5", f"{fb}:2", "-o", str(out)]) == 0
    same_embeddings({**a.embeddings, **b.embeddings}, load_adapter(out).embeddings)  # unscaled by the weights

    c = sd1_adapter(tiny.pipe, ("inkwash",), seed=9)
    fc = save_adapter(c, tmp_path / "c.safetensors", pipe=tiny.pipe, metadata=meta())
    assert main(["merge", str(fa), str(fc), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(fa) in err and str(fc) in err and "'inkwash'" in err and "--rename" in err
    assert main(["merge", str(fa), str(fc), "--rename", f"{fc}:inkwash=inkwash2", "-o", str(out), "--overwrite"]) == 0
    got = load_adapter(out).embeddings
    assert torch.equal(got["inkwash"].vectors["text_encoder"], a.embeddings["inkwash"].vectors["text_encoder"])
    assert torch.equal(got["inkwash2"].vectors["text_encoder"], c.embeddings["inkwash"].vectors["text_encoder"])
    renamed = merge([(a, 1.0), (c, 1.0)], rename=["inkwash=other"]).adapter.embeddings  # no FILE: not the first
    assert sorted(renamed) == ["inkwash", "other"]
    with pytest.raises(Exception, match="no embedding 'nothere'"):
        merge([(a, 1.0), (b, 1.0)], rename=["nothere=x"])


def test_inspect_shows_embeddings(tiny, tmp_path, capsys):
    a = sd1_adapter(tiny.pipe)
    f = save_adapter(a, tmp_path / "s.safetensors", pipe=tiny.pipe)
    info = describe(f)
    vec = a.embeddings["inkwash"].vectors["text_encoder"]
    norm = float(torch.sqrt((vec.double() ** 2).sum(dim=1)).mean())
    (row,) = info["embeddings"]
    assert row["name"] == "inkwash" and row["num_tokens"] == 2 and row["tokens"] == ["inkwash", "inkwash_1"]
    c = row["components"]["text_encoder"]
    assert c["key"] == "bundle_emb.inkwash.string_to_param.*" and c["width"] == 32 and c["dtype"] == "F32"
    assert c["mean_norm"] == pytest.approx(norm, rel=1e-6)
    assert info["unrecognized_keys"] == [] and info["embeddings_error"] is None
    assert main(["inspect", str(f)]) == 0
    assert "embedding       inkwash: 2 tokens; text_encoder width 32" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ errors
def test_bad_embeddings_are_clear_errors_naming_file_and_key(tiny, tmp_path):
    lora = load_file(save_adapter(Adapter(unet_lora(tiny.pipe)), tmp_path / "plain.safetensors", pipe=tiny.pipe))
    cases = {
        "wide": ({"bundle_emb.w.string_to_param.*": torch.randn(2, 768)}, r"width 768 \(the width of SD1.5"),
        "nan": ({"bundle_emb.w.string_to_param.*": torch.tensor([[float("nan")] * 32])}, "NaN"),
        "int": ({"stylelora_emb.w.text_encoder": torch.ones(2, 32, dtype=torch.int32)}, "floating.point"),
    }
    for name, (extra, message) in cases.items():
        f = tmp_path / f"{name}.safetensors"
        save_file({**lora, **extra}, f)
        with pytest.raises(AdapterError, match=message) as e:
            load_adapter(f, pipe=tiny.pipe)
        assert str(f) in str(e.value) and next(iter(extra)) in str(e.value)
    with pytest.raises(AdapterError, match="cannot be an embedding's trigger word"):
        save_adapter(Adapter(unet_lora(tiny.pipe), embeddings={"two words": emb("two words", 1, {"text_encoder": 32})}),
                     tmp_path / "x.safetensors")
    with pytest.raises(AdapterError, match="width 1024") as e:  # no base given: the built-in SDXL widths
        load_adapter(_sdxl_file(tmp_path, torch.randn(1, 768), torch.randn(1, 1024)))
    assert "bundle_emb.inkwash.clip_g" in str(e.value) and "SD2.x text_encoder" in str(e.value)
    f = _sdxl_file(tmp_path, torch.randn(2, 768), torch.randn(3, 1280))
    with pytest.raises(AdapterError, match="different token counts") as e:
        load_adapter(f)
    assert f in str(e.value) and "bundle_emb.inkwash.clip_l 2" in str(e.value)
    with pytest.raises(AdapterError, match="SDXL models have"):
        save_adapter(Adapter(unet_lora(tiny.pipe), family="sdxl",
                             embeddings={"w": emb("w", 1, {"text_encoder": 32})}), tmp_path / "z.safetensors",
                     family=Family("sdxl"))


def _sdxl_file(tmp_path, clip_l, clip_g) -> str:
    xl = load_file(save_adapter(sdxl_adapter(words=()), tmp_path / "xlbase.safetensors", family=Family("sdxl")))
    f = tmp_path / "xlbad.safetensors"
    save_file({**xl, "bundle_emb.inkwash.clip_l": clip_l, "bundle_emb.inkwash.clip_g": clip_g}, f,
              {"ss_base_model_version": "sdxl_base_v1-0"})
    return str(f)
