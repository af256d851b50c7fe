"""Adapter files: round trips between layouts, accepted spellings, conv LoRA, metadata, kohya hashes, atomic saves."""
import base64
import hashlib
import io
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save, save_file

from stylelora.adapter import Adapter, LoraModule
from stylelora.config import DataConfig, NetworkConfig, RunConfig, TrainConfig
from stylelora.data import ImageItem
from stylelora.formats import load_adapter, model_hashes, read_metadata, save_adapter, training_metadata
from stylelora.formats.arch import builtin_table
from stylelora.models import Family, load_base

UNET_T = ("to_q", "to_k", "to_v", "to_out.0")
TE_T = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="session")
def tiny(tiny_base):
    """The session's tiny base (tests/conftest.py builds it once, in a temp STYLELORA_HOME); only read here."""
    return tiny_base


def make_adapter(pipe, *, ranks=(4, 2), alphas=(2.0, 6.0), std=0.3, seed=0, dtype=torch.float32) -> Adapter:
    """Nonzero random LoRA on every UNet attention projection and text-encoder q/k/v/out (rank != alpha)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for comp, model, targets, r, a in (("unet", pipe.unet, UNET_T, ranks[0], alphas[0]),
                                       ("text_encoder", pipe.text_encoder, TE_T, ranks[1], alphas[1])):
        mods[comp] = {
            n: LoraModule((torch.randn(r, m.in_features, generator=g) * std).to(dtype),
                          (torch.randn(m.out_features, r, generator=g) * std).to(dtype), a)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)
        }
    return Adapter(mods, family="sd1", name="made")


def tiny_meta() -> dict:
    """What a file trained on the tiny-random base carries (its config names the base), so it resolves without a
    pipe."""
    return {"stylelora.config": TrainConfig().replace(base="tiny-random").to_json()}


def same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------- round trips
def test_save_load_both_layouts_exact(tiny, tmp_path):
    a = make_adapter(tiny.pipe)
    for fmt in ("kohya", "peft"):
        f = save_adapter(a, tmp_path / f"style-{fmt}.safetensors", format=fmt, pipe=tiny.pipe, metadata=tiny_meta())
        b = load_adapter(f, pipe=tiny.pipe)
        assert b.content_hash() == a.content_hash()
        assert b.family == "sd1" and b.name == f"style-{fmt}"
        assert read_metadata(f)["stylelora.format"] == fmt
        c = load_adapter(f)  # no pipe: resolved through the built-in tiny table named by the metadata
        assert c.content_hash() == a.content_hash() and c.family == "sd1"


def test_kohya_keys_and_alpha_tensors(tiny, tmp_path):
    a = make_adapter(tiny.pipe)
    sd = load_file(save_adapter(a, tmp_path / "a.safetensors", pipe=tiny.pipe))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert sd[f"{name}.lora_down.weight"].shape == (4, 32) and sd[f"{name}.lora_up.weight"].shape == (32, 4)
    assert sd[f"{name}.alpha"].dim() == 0 and sd[f"{name}.alpha"].item() == 2.0
    te = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    assert sd[f"{te}.alpha"].item() == 6.0 and sd[f"{te}.lora_down.weight"].shape == (2, 32)
    assert len(sd) == 3 * a.num_modules()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kohya_peft_kohya_bit_identical(tiny, tmp_path, dtype):
    a = make_adapter(tiny.pipe, dtype=dtype)
    k1 = save_adapter(a, tmp_path / "k1.safetensors", metadata=tiny_meta())
    p = save_adapter(load_adapter(k1), tmp_path / "p.safetensors", format="peft")
    k2 = save_adapter(load_adapter(p), tmp_path / "k2.safetensors")
    same_tensors(load_file(k1), load_file(k2))
    assert read_metadata(k1)["sshs_model_hash"] == read_metadata(k2)["sshs_model_hash"]


def test_peft_kohya_peft_bit_identical_with_rank_and_alpha_patterns(tiny, tmp_path):
    a = make_adapter(tiny.pipe)
    odd = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    m = a.modules["unet"][odd]
    a.modules["unet"][odd] = LoraModule(torch.randn(8, m.down.shape[1]), torch.randn(m.up.shape[0], 8), 3.0)
    p1 = save_adapter(a, tmp_path / "p1.safetensors", format="peft", metadata=tiny_meta())
    cfg = json.loads(read_metadata(p1)["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 2.0 and cfg["text_encoder.lora_alpha"] == 6.0
    assert cfg["unet.rank_pattern"] == {odd: 8} and cfg["unet.alpha_pattern"] == {odd: 3.0}
    k = save_adapter(load_adapter(p1), tmp_path / "k.safetensors")
    p2 = save_adapter(load_adapter(k), tmp_path / "p2.safetensors", format="peft")
    same_tensors(load_file(p1), load_file(p2))
    assert read_metadata(p2)["lora_adapter_metadata"] == read_metadata(p1)["lora_adapter_metadata"]
    assert load_adapter(p2).content_hash() == a.content_hash()


def test_sdxl_layout_uses_ldm_names_and_two_text_encoders(tmp_path):
    table = builtin_table("sdxl")
    te1 = next(p for p in table.components["text_encoder"].shapes if p.endswith("layers.0.self_attn.q_proj"))
    te2 = next(p for p in table.components["text_encoder_2"].shapes if p.endswith("layers.31.self_attn.out_proj"))
    paths = {"unet": ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                      "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0"],
             "text_encoder": [te1], "text_encoder_2": [te2]}
    mods = {c: {p: LoraModule(torch.randn(2, table.components[c].shapes[p][1]),
                              torch.randn(table.components[c].shapes[p][0], 2), 1.0) for p in ps}
            for c, ps in paths.items()}
    a = Adapter(mods, family="sdxl")
    sd = load_file(save_adapter(a, tmp_path / "xl.safetensors", family=Family("sdxl")))
    assert sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape == (2, 640)
    assert sd["lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_out_0.lora_up.weight"].shape == (640, 2)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj.alpha" in sd
    back = load_adapter(tmp_path / "xl.safetensors")
    assert back.family == "sdxl" and back.content_hash() == a.content_hash()


# -------------------------------------------------------------------------------------- other spellings
def test_missing_alpha_means_alpha_equals_rank(tiny, tmp_path):
    a = make_adapter(tiny.pipe)
    sd = {k: v for k, v in load_file(save_adapter(a, tmp_path / "a.safetensors")).items() if not k.endswith(".alpha")}
    save_file(sd, tmp_path / "noalpha.safetensors")
    b = load_adapter(tmp_path / "noalpha.safetensors", pipe=tiny.pipe)
    assert {m.alpha for mods in b.modules.values() for m in mods.values()} == {4.0, 2.0}


def test_older_diffusers_spellings(tiny, tmp_path):
    a = make_adapter(tiny.pipe)
    unet, te = a.modules["unet"], a.modules["text_encoder"]
    sd = {}
    for i, (p, m) in enumerate(sorted(unet.items())):
        if p.endswith(("to_q", "to_out.0")) and i % 2:  # old attention processors, bare keys
            parent, leaf = p.rsplit(".attn", 1)[0], "to_out_lora" if p.endswith("to_out.0") else "to_q_lora"
            attn = "attn" + p.rsplit(".attn", 1)[1].split(".")[0]
            sd[f"{parent}.{attn}.processor.{leaf}.down.weight"] = m.down
            sd[f"{parent}.{attn}.processor.{leaf}.up.weight"] = m.up
        else:
            sd[f"unet.{p}.lora.down.weight"], sd[f"unet.{p}.lora.up.weight"] = m.down, m.up
    for i, (p, m) in enumerate(sorted(te.items())):
        if i % 2:
            sd[f"text_encoder.text_model.{p}.lora_linear_layer.down.weight"] = m.down
            sd[f"text_encoder.text_model.{p}.lora_linear_layer.up.weight"] = m.up
        else:
            name = p.replace("q_proj", "to_q_lora").replace("k_proj", "to_k_lora").replace("v_proj", "to_v_lora")
            name = name.replace("out_proj", "to_out_lora")
            sd[f"text_encoder.text_model.{name}.down.weight"] = m.down
            sd[f"text_encoder.text_model.{name}.up.weight"] = m.up
    save_file(sd, tmp_path / "old.safetensors")
    b = load_adapter(tmp_path / "old.safetensors", pipe=tiny.pipe)
    for comp in ("unet", "text_encoder"):
        assert sorted(b.modules[comp]) == sorted(a.modules[comp])
        for p, m in a.modules[comp].items():
            assert torch.equal(b.modules[comp][p].down, m.down) and b.modules[comp][p].alpha == m.rank


def test_diffusers_output_folder_from_save_lora_weights(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_base("tiny-random").pipe
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(UNET_T), init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=list(TE_T), init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "run", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    b = load_adapter(tmp_path / "run", pipe=tiny.pipe)
    assert load_adapter(tmp_path / "run", pipe=pipe).content_hash() == b.content_hash()  # PEFT-wrapped live model
    assert b.name == "run" and len(b.modules["unet"]) == 56 and len(b.modules["text_encoder"]) == 8
    for comp, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path, m in b.modules[comp].items():
            layer = model.get_submodule(path)
            torch.testing.assert_close(m.delta(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)


def test_conv_lora_diffusers_and_ldm_names(tiny, tmp_path):
    unet = tiny.pipe.unet
    g = torch.Generator().manual_seed(3)
    for key, path in (("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1"),
                      ("lora_unet_output_blocks_0_0_out_layers_3", "up_blocks.0.resnets.0.conv2")):
        w = unet.get_submodule(path).weight
        down, up = torch.randn(3, w.shape[1], 3, 3, generator=g), torch.randn(w.shape[0], 3, 1, 1, generator=g)
        f = tmp_path / "locon.safetensors"
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(1.5)}, f)
        m = load_adapter(f, pipe=tiny.pipe).modules["unet"][path]
        assert m.delta().shape == w.shape and m.alpha == 1.5
        want = 0.5 * torch.einsum("or,rikl->oikl", up.flatten(1), down)
        torch.testing.assert_close(m.delta(), want)
        out = load_file(save_adapter(load_adapter(f, pipe=tiny.pipe), tmp_path / "o.safetensors", pipe=tiny.pipe))
        name = "lora_unet_" + path.replace(".", "_")  # SD1-family files use diffusers names
        assert torch.equal(out[f"{name}.lora_down.weight"], down)
    assert json.loads(read_metadata(tmp_path / "o.safetensors")["ss_network_args"]) == {"conv_dim": "3",
                                                                                          "conv_alpha": "1.5"}


# ------------------------------------------------------------------------------------------------ metadata
def items(folder):
    return [ImageItem(folder / "a.png", "sks, red, red", 1, ".", 512, 512),
            ImageItem(folder / "b.png", "sks, Blue sky", 1, ".", 512, 512),
            ImageItem(folder / "10_x" / "c.png", "sks", 10, "10_x", 640, 384)]


def test_training_metadata(tmp_path):
    config = TrainConfig(data=DataConfig(folder=str(tmp_path / "imgs"), trigger="sks", resolution=512),
                         network=NetworkConfig(rank=8, alpha=4.0, train_text_encoder=True),
                         run=RunConfig(output="out/my-style.safetensors", seed=7))
    thumb = Image.new("RGBA", (640, 480), (10, 200, 30, 128))
    md = training_metadata(config, Family("sd1"), items=items(tmp_path / "imgs"), base_name="runwayml/sd15",
                           steps=120, epoch=3, started_at=1700000000.5, finished_at=1700000600.25, thumbnail=thumb)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "8"
    assert md["ss_network_alpha"] == "4.0" and json.loads(md["ss_network_args"]) == {}
    assert md["ss_v2"] == "False" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_resolution"] == "(512, 512)" and md["ss_output_name"] == "my-style"
    assert md["ss_sd_model_name"] == "runwayml/sd15" and md["ss_steps"] == "120" and md["ss_epoch"] == "3"
    assert md["ss_num_train_images"] == "12" and md["ss_seed"] == "7" and md["ss_clip_skip"] == "None"
    assert md["ss_learning_rate"] == md["ss_unet_lr"] == md["ss_text_encoder_lr"] == "0.0001"
    assert md["ss_training_started_at"] == "1700000000.5" and md["ss_training_finished_at"] == "1700000600.25"
    assert json.loads(md["ss_tag_frequency"]) == {"imgs": {"sks": 2, "red": 1, "Blue sky": 1}, "10_x": {"sks": 1}}
    assert json.loads(md["ss_dataset_dirs"]) == {"imgs": {"n_repeats": 1, "img_count": 2},
                                                 "10_x": {"n_repeats": 10, "img_count": 1}}
    assert md["modelspec.sai_model_spec"] == "1.0.1"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.resolution"] == "512x512" and md["modelspec.trigger_phrase"] == "sks"
    assert md["modelspec.prediction_type"] == "epsilon" and md["modelspec.date"].startswith("2023-11-")
    assert md["modelspec.title"] == "my-style" and md["modelspec.implementation"] == "diffusers"
    assert md["stylelora.family"] == "sd1" and md["stylelora.format"] == "kohya" and md["stylelora.version"]
    assert TrainConfig.from_dict(json.loads(md["stylelora.config"])) == config
    head, data = md["modelspec.thumbnail"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    assert max(Image.open(io.BytesIO(base64.b64decode(data))).size) <= 256
    md2 = training_metadata(config, Family("sd2", "v_prediction"), items=[], base_name="b", steps=1, epoch=1,
                            started_at=0.0, finished_at=1.0)
    assert md2["ss_v2"] == "True" and md2["ss_base_model_version"] == "sd_v2_v"
    assert md2["modelspec.prediction_type"] == "v" and "modelspec.thumbnail" not in md2


# -------------------------------------------------------------------------------------------------- hashes
def big_adapter() -> Adapter:
    """Over 1 MiB of tensors, so the legacy hash (bytes 0x100000..0x110000) reads real data."""
    g = torch.Generator().manual_seed(5)
    mods = {f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{t}": LoraModule(
        torch.randn(64, 1024, generator=g), torch.randn(1024, 64, generator=g), 16.0) for t in ("to_q", "to_k")}
    return Adapter({"unet": mods}, family="sd1")


def test_sshs_hashes_match_kohya_and_ignore_non_ss_metadata(tmp_path):
    a = big_adapter()
    md = {"ss_output_name": "big", "modelspec.title": "Big"}
    f = save_adapter(a, tmp_path / "big.safetensors", metadata=md)
    stored = read_metadata(f)
    # independent recomputation: the same tensors serialized with only the ss_* metadata
    only_ss = tmp_path / "only-ss.safetensors"
    save_file(load_file(f), only_ss, metadata={k: v for k, v in stored.items() if k.startswith("ss_")})
    buf = only_ss.read_bytes()
    n = int.from_bytes(buf[:8], "little")
    assert stored["sshs_model_hash"] == hashlib.sha256(buf[8 + n:]).hexdigest()
    assert stored["sshs_legacy_hash"] == hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]
    assert stored["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    assert model_hashes(f) == (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == model_hashes(buf)
    # editing metadata, by us or by another tool, leaves the model hash alone
    g = save_adapter(a, tmp_path / "edited.safetensors", metadata={**md, "modelspec.title": "Renamed", "x": "y"})
    assert read_metadata(g)["sshs_model_hash"] == stored["sshs_model_hash"]
    assert read_metadata(g)["sshs_legacy_hash"] == stored["sshs_legacy_hash"]
    retagged = tmp_path / "retagged.safetensors"
    save_file(load_file(f), retagged, metadata={**stored, "ss_output_name": "another name", "note": "hi"})
    assert model_hashes(retagged)[0] == stored["sshs_model_hash"]
    buf2 = retagged.read_bytes()
    assert hashlib.sha256(buf2[8 + int.from_bytes(buf2[:8], "little"):]).hexdigest() == stored["sshs_model_hash"]


def test_model_hashes_of_bytes_is_kohya_formula():
    buf = save({"w": torch.arange(300000, dtype=torch.float32)}, {"ss_a": "1"})
    n = int.from_bytes(buf[:8], "little")
    assert model_hashes(buf) == (hashlib.sha256(buf[8 + n:]).hexdigest(),
                                 hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8])


# ------------------------------------------------------------------------------------------- atomic saves
def test_save_is_atomic(tiny, tmp_path, monkeypatch):
    a = make_adapter(tiny.pipe)
    f = save_adapter(a, tmp_path / "a.safetensors")
    before = f.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(make_adapter(tiny.pipe, seed=9), f)
    assert f.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temp file left behind
