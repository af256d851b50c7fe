"""``stylelora inspect`` and ``stylelora convert`` through the CLI entry point."""
import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from stylelora.adapter import Adapter, LoraModule
from stylelora.cli import main
from stylelora.config import DataConfig, TrainConfig
from stylelora.data import ImageItem
from stylelora.formats import load_adapter, read_metadata, save_adapter, training_metadata

UNET_T = ("to_q", "to_k", "to_v", "to_out.0")
TE_T = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="session")
def tiny(tiny_base):
    """The session's tiny base (tests/conftest.py builds it once, in a temp STYLELORA_HOME); only read here."""
    return tiny_base


def make_adapter(pipe) -> Adapter:
    g = torch.Generator().manual_seed(0)
    mods = {}
    for comp, model, targets, r, a in (("unet", pipe.unet, UNET_T, 4, 2.0),
                                       ("text_encoder", pipe.text_encoder, TE_T, 2, 6.0)):
        mods[comp] = {n: LoraModule(torch.randn(r, m.in_features, generator=g),
                                    torch.randn(m.out_features, r, generator=g), a)
                      for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)}
    return Adapter(mods, family="sd1")


@pytest.fixture
def trained(tiny, tmp_path):
    """A kohya file as training writes it: tiny base, trigger word, full metadata."""
    config = TrainConfig(data=DataConfig(folder=str(tmp_path / "imgs"), trigger="inkwash")).replace(base="tiny-random")
    items = [ImageItem(tmp_path / "imgs" / f"{i}.png", "inkwash, mountain" if i else "inkwash", 2, ".", 512, 512)
             for i in range(3)]
    now = time.time()
    md = training_metadata(config, tiny.family, items=items, base_name="tiny-random", steps=50, epoch=2,
                           started_at=now - 90, finished_at=now)
    return save_adapter(make_adapter(tiny.pipe), tmp_path / "inkwash.safetensors", metadata=md, pipe=tiny.pipe)


# ----------------------------------------------------------------------------------------------- inspect
def test_inspect_json(trained, capsys):
    assert main(["inspect", str(trained), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)
    assert out.strip() == json.dumps(info, sort_keys=True, indent=2)  # stable: sorted keys
    assert info["schema_version"] == 2 and info["format"] == "kohya" and info["unet_naming"] == "diffusers"
    assert info["family"] == "sd1" and info["family_source"] == "metadata stylelora.family=sd1"
    assert info["num_modules"] == 64 and info["num_tensors"] == 192 and info["supported"] is True
    unet, te = info["components"]["unet"], info["components"]["text_encoder"]
    assert (unet["modules"], unet["rank"], unet["alpha"], unet["scale"]) == (56, 4, 2.0, 0.5)
    assert (te["modules"], te["rank"], te["alpha"], te["ranks"]) == (8, 2, 6.0, [2])
    assert info["trigger"] == "inkwash"
    h = info["hashes"]
    assert h["matches"] is True and h["sshs_model_hash"] == h["model_hash"] == read_metadata(trained)["sshs_model_hash"]
    t = info["training"]
    assert (t["steps"], t["epoch"], t["num_train_images"], t["base_model"]) == (50, 2, 6, "tiny-random")
    assert t["resolution"] == "512x512" and t["top_tags"][0] == ["inkwash", 3] and round(t["duration_s"]) == 90
    assert t["config"]["data"]["trigger"] == "inkwash"
    assert t["network_dim"] == 4 and t["network_alpha"] == 2.0  # the tensors win over the config (rank 16)
    assert info["readers"] == {"diffusers": "yes", "ComfyUI": "yes", "A1111": "yes", "kohya": "yes"}


def test_inspect_text(trained, capsys):
    assert main(["inspect", str(trained)]) == 0
    out = capsys.readouterr().out
    for text in ("format          kohya", "family          sd1", "rank 4, alpha 2 (scale 0.5)", "rank 2, alpha 6",
                 "trigger         inkwash", "matches the tensors", "50 steps", "inkwash (3)"):
        assert text in out, text


def test_inspect_peft_and_bad_file(trained, tmp_path, capsys):
    peft = tmp_path / "inkwash-peft.safetensors"
    assert main(["convert", str(trained), "--to", "peft", "-o", str(peft)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(peft), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "peft" and info["components"]["text_encoder"]["alpha"] == 6.0
    assert info["components"]["unet"]["scale"] == 0.5 and info["unet_naming"] is None
    assert info["readers"] == {"diffusers": "yes", "ComfyUI": "partly", "A1111": "no", "kohya": "no"}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    assert main(["inspect", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["in", "out"])
def test_inspect_readers_of_dora_and_loha_files(tmp_path, capsys, layout):
    """The readers line follows docs/formats.md: an input-axis DoRA file is read right by A1111 and ComfyUI, an
    output-axis one is not; diffusers drops dora_scale (plain LoRA); a LoHa is refused by diffusers."""
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    dora = {f"{name}.lora_down.weight": torch.randn(2, 32), f"{name}.lora_up.weight": torch.randn(32, 2),
            f"{name}.alpha": torch.tensor(2.0),
            f"{name}.dora_scale": torch.rand(1, 32) if layout == "in" else torch.rand(32, 1)}
    save_file(dora, str(tmp_path / "d.safetensors"))
    assert main(["inspect", str(tmp_path / "d.safetensors"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["readers"]
    a1111_comfy = "yes" if layout == "in" else "wrong result"
    assert got == {"diffusers": "as plain LoRA", "ComfyUI": a1111_comfy, "A1111": a1111_comfy,
                   "kohya": "with LyCORIS"}
    loha = {f"{name}.hada_w1_a": torch.randn(32, 2), f"{name}.hada_w1_b": torch.randn(2, 32),
            f"{name}.hada_w2_a": torch.randn(32, 2), f"{name}.hada_w2_b": torch.randn(2, 32),
            f"{name}.alpha": torch.tensor(2.0)}
    save_file(loha, str(tmp_path / "h.safetensors"))
    assert main(["inspect", str(tmp_path / "h.safetensors")]) == 0
    assert "readers         diffusers no; ComfyUI yes; A1111 yes; kohya with LyCORIS" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- convert
def test_convert_round_trip_keeps_input_and_tensors(trained, tmp_path, capsys):
    before = trained.read_bytes()
    peft, back = tmp_path / "p.safetensors", tmp_path / "k.safetensors"
    assert main(["convert", str(trained), "--to", "peft", "-o", str(peft)]) == 0
    assert main(["convert", str(peft), "--to", "kohya", "-o", str(back)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert trained.read_bytes() == before
    a, b = load_file(trained), load_file(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    md = read_metadata(back)
    assert md["ss_tag_frequency"] == read_metadata(trained)["ss_tag_frequency"]  # metadata travels along
    assert md["stylelora.format"] == "kohya" and "lora_adapter_metadata" not in md


def test_convert_never_overwrites_input(trained, tmp_path, capsys):
    before = trained.read_bytes()
    aliases = [trained, tmp_path / "imgs" / ".." / trained.name]
    link = tmp_path / "link.safetensors"
    link.symlink_to(trained)
    for out in [*aliases, link]:
        for extra in ([], ["--force"]):
            assert main(["convert", str(trained), "--to", "peft", "-o", str(out), *extra]) == 2
            assert "is the input" in capsys.readouterr().err
    assert trained.read_bytes() == before


def test_convert_refuses_existing_output_unless_forced(trained, tmp_path, capsys):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"precious")
    assert main(["convert", str(trained), "--to", "peft", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and out.read_bytes() == b"precious"
    assert main(["convert", str(trained), "--to", "peft", "-o", str(out), "--force"]) == 0
    assert load_adapter(out).content_hash() == load_adapter(trained).content_hash()
    assert main(["convert", str(trained), "--to", "peft", "-o", str(tmp_path / "x.bin")]) == 2


def test_convert_with_base_for_file_without_metadata(tiny, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(save_adapter(make_adapter(tiny.pipe), tmp_path / "full.safetensors")), bare)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(bare), "--to", "peft", "-o", str(out)]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["convert", str(bare), "--to", "peft", "-o", str(out), "--base", "tiny-random"]) == 0
    assert load_adapter(out, pipe=tiny.pipe).content_hash() == load_adapter(bare, pipe=tiny.pipe).content_hash()


def test_convert_unused_keys_flag(tiny, trained, tmp_path, capsys):
    extra = dict(load_file(trained))
    extra["lora_unet_nowhere_to_q.lora_down.weight"] = torch.ones(2, 8)
    extra["lora_unet_nowhere_to_q.lora_up.weight"] = torch.ones(8, 2)
    f = tmp_path / "extra.safetensors"
    save_file(extra, f, metadata=read_metadata(trained))
    out = tmp_path / "o.safetensors"
    assert main(["convert", str(f), "--to", "kohya", "-o", str(out)]) == 2
    assert "lora_unet_nowhere_to_q" in capsys.readouterr().err
    assert main(["convert", str(f), "--to", "kohya", "-o", str(out), "--allow-unused-keys"]) == 0
    assert sorted(load_file(out)) == sorted(load_file(trained))


@pytest.mark.parametrize("spec", ["tiny-random", "tiny-sdxl"])
def test_convert_round_trip_without_base_for_custom_size_models(spec, tmp_path):
    """kohya -> PEFT -> kohya of adapters for small non-standard bases, from the files alone (they only say their
    family): bit-identical, and every PEFT key names a real module of the model (diffusers' own module tree)."""
    from stylelora.models import load_base

    base = load_base(spec)
    g = torch.Generator().manual_seed(1)
    mods: dict = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(base.pipe, comp, None)
        targets = UNET_T if comp == "unet" else TE_T
        for n, m in (model.named_modules() if model is not None else ()):
            if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets):
                mods.setdefault(comp, {})[n] = LoraModule(torch.randn(2, m.in_features, generator=g),
                                                          torch.randn(m.out_features, 2, generator=g), 1.5)
    kohya = save_adapter(Adapter(mods, family=base.family.key), tmp_path / "k.safetensors", pipe=base.pipe)
    assert not {"ss_sd_model_name", "stylelora.config"} & set(read_metadata(kohya))
    peft_file, back = tmp_path / "p.safetensors", tmp_path / "k2.safetensors"
    assert main(["convert", str(kohya), "--to", "peft", "-o", str(peft_file)]) == 0
    assert main(["convert", str(peft_file), "--to", "kohya", "-o", str(back)]) == 0
    original, peft_sd, again = load_file(kohya), load_file(peft_file), load_file(back)
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[k], original[k]) for k in original)
    live = {f"{c}.{n}" for c in mods for n, _ in getattr(base.pipe, c).named_modules()}
    live |= {f"{c}.text_model.{n}" for c in mods if c != "unet" for n, _ in getattr(base.pipe, c).named_modules()}
    modules = {k.rsplit(".lora_", 1)[0] for k in peft_sd}
    assert modules <= live and len(modules) == sum(len(m) for m in mods.values())
    if spec == "tiny-sdxl":  # kohya's SDXL layout: ldm (sgm) UNet names
        assert any(k.startswith("lora_unet_input_blocks_") for k in original)
