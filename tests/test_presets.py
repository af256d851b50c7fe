"""The training recipes of stylelora/presets.py are what the config defaults, the web UI and the toy world train."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest

from stylelora import presets
from stylelora.config import SECTIONS, TrainConfig
from stylelora.errors import ConfigError
from stylelora.toy import world
from stylelora.webui import training as webtraining

FIELDS = {f.name for klass in SECTIONS.values() for f in dataclasses.fields(klass)}


@pytest.mark.parametrize("name", list(presets.RECIPES))
def test_every_recipe_names_real_fields_and_builds_a_valid_config(name):
    recipe = presets.RECIPES[name]
    assert recipe.name == name and recipe.base and recipe.note
    assert set(recipe.overrides) <= FIELDS, set(recipe.overrides) - FIELDS
    cfg = recipe.config(folder="imgs", trigger="zzstyle")  # the toy recipe learns trigger tokens: it needs one
    for key, value in recipe.overrides.items():
        assert cfg.get(key) == value, key
    assert cfg.data.folder == "imgs"
    with pytest.raises(TypeError):  # a recipe cannot be changed for everyone by editing its dict
        recipe.overrides["steps"] = 1


def test_the_config_defaults_are_the_default_recipe():
    fields = {f.name: f for klass in SECTIONS.values() for f in dataclasses.fields(klass)}
    for key, value in presets.DEFAULT.overrides.items():
        assert fields[key].default == value, key
    # the documented SD1.x numbers (README): rank 16, lr 1e-4, 512 px, min-SNR-gamma 5, 1000 steps
    cfg = TrainConfig()
    assert (cfg.network.rank, cfg.optim.lr, cfg.data.resolution, cfg.optim.min_snr_gamma, cfg.run.steps) == \
        (16, 1e-4, 512, 5.0, 1000)


def test_toy_recipe_matches_the_toy_world_and_train_config():
    assert presets.TOY["resolution"] == world.SIZE and presets.TOY["base"] == "tiny"
    # without regularization pictures: half the steps, everything else the same
    assert presets.TOY_NO_REG["steps"] * 2 == presets.TOY["steps"]
    assert {k: v for k, v in presets.TOY_NO_REG.overrides.items() if k != "steps"} == \
        {k: v for k, v in presets.TOY.overrides.items() if k != "steps"}
    reg = world.train_config("style", "trg", "o.safetensors", reg_folder="plain")
    alone = world.train_config("style", "trg", "o.safetensors", lr=5e-4)
    assert (reg.run.steps, alone.run.steps) == (300, 150)
    assert (reg.data.folder, reg.data.reg_folder, reg.data.trigger, reg.run.output) == \
        ("style", "plain", "trg", "o.safetensors")
    assert alone.data.reg_folder is None and alone.optim.lr == 5e-4 and alone.optim.te_lr == 1e-3
    assert (reg.network.rank, reg.network.train_text_encoder, reg.optim.lr_scheduler, reg.run.batch_size) == \
        (8, True, "cosine", 4)


def _base(dtype="torch.float32"):
    return types.SimpleNamespace(spec="some-base", pipe=types.SimpleNamespace(unet=types.SimpleNamespace(dtype=dtype)))


@pytest.mark.parametrize("name, numbers", [("quick", (400, 8, 2e-4)), ("standard", (1200, 16, 1e-4)),
                                           ("thorough", (3000, 32, 1e-4))])
def test_web_ui_presets_train_their_recipe(name, numbers):
    assert webtraining.PRESETS is presets.WEBUI
    req = webtraining.TrainRequest(name="n", trigger=" t ", preset=name)
    cfg = webtraining.build_config(req, Path("imgs"), Path("o.safetensors"), base=_base("torch.float16"), native=768)
    assert (cfg.run.steps, cfg.network.rank, cfg.optim.lr) == numbers
    assert (cfg.data.resolution, cfg.data.trigger, cfg.run.mixed_precision, cfg.run.base) == (768, "t", "fp16",
                                                                                              "some-base")
    assert cfg.run.sample_every == numbers[0] // 4
    # fields no preset sets keep the defaults
    assert cfg.optim.weight_decay == TrainConfig().optim.weight_decay and cfg.run.batch_size == 1
    over = webtraining.TrainRequest(name="n", preset=name, steps=9, rank=4, lr=1e-5, resolution=128, sample_every=0)
    cfg = webtraining.build_config(over, Path("imgs"), Path("o.safetensors"), base=_base(), native=768)
    assert (cfg.run.steps, cfg.network.rank, cfg.optim.lr, cfg.data.resolution, cfg.run.sample_every) == \
        (9, 4, 1e-5, 128, 0)
    with pytest.raises(ConfigError, match="preset"):
        webtraining.build_config(webtraining.TrainRequest(name="n", preset="forever"), Path("i"), Path("o"),
                                 base=_base(), native=512)


def test_describe_names_the_numbers():
    assert presets.WEBUI["quick"].describe().startswith("400 steps, rank 8, learning rate 0.0002:")


def test_the_toy_base_names_match_the_model_table():
    from stylelora.models import TINY

    assert set(presets.TOY_BASES) == {spec for spec, kind in TINY.items() if kind == "toy"}


@pytest.mark.parametrize("name", ["default", "quick", "standard", "thorough"])
def test_on_the_tiny_base_every_recipe_takes_the_toy_optimiser_and_keeps_its_place_on_the_scale(name):
    real = presets.RECIPES[name]
    tiny = presets.for_base(name, "tiny")
    assert tiny.name == f"{name}@tiny"
    steps, rank = presets.TINY_STEPS_RANK[name]
    cfg = tiny.config(folder="imgs", trigger="zz")
    assert (cfg.run.steps, cfg.network.rank) == (steps, rank)
    for key in ("resolution", "lr", "te_lr", "train_text_encoder", "train_tokens", "token_lr", "batch_size"):
        assert cfg.get(key) == presets.TOY[key], key
    # real bases: the recipe itself, untouched
    for base in ("./sd15", "runwayml/stable-diffusion-v1-5", "tiny-random", "tiny-sdxl", None):
        assert presets.for_base(name, base) is real
    assert presets.for_base("toy", "tiny") is presets.TOY  # no second scaling of the toy recipe
    quick, std, thorough = (presets.for_base(n, "tiny") for n in ("quick", "standard", "thorough"))
    assert quick["steps"] < std["steps"] < thorough["steps"] and quick["rank"] < std["rank"] < thorough["rank"]


def _cli_config(argv):
    import argparse

    from stylelora.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers())
    args = parser.parse_args(["train", *argv])
    return cli_train.recipe_of(args).name, cli_train.config_from_args(args)


def test_cli_defaults_follow_the_base_and_flags_and_toml_still_win(tmp_path):
    name, cfg = _cli_config(["imgs", "--trigger", "zz", "-o", "o.safetensors"])  # base defaults to tiny
    assert name == "default@tiny" and cfg.run.base == "tiny"
    assert (cfg.run.steps, cfg.network.rank, cfg.optim.lr, cfg.data.resolution) == (300, 8, 1e-3, 64)
    name, cfg = _cli_config(["imgs", "-o", "o.safetensors"])  # no trigger: no learnt tokens, the rest the same
    assert name == "default@tiny" and cfg.network.train_tokens == 0 and cfg.optim.lr == 1e-3
    name, cfg = _cli_config(["imgs", "-o", "o.safetensors", "--base", "./sd15"])
    assert name == "default" and cfg == TrainConfig().replace(folder="imgs", output="o.safetensors", base="./sd15")
    name, cfg = _cli_config(["imgs", "-o", "o.safetensors", "--recipe", "quick", "--lr", "5e-4", "--steps", "7",
                             "--trigger", "zz"])
    assert name == "quick@tiny" and (cfg.optim.lr, cfg.run.steps, cfg.network.rank) == (5e-4, 7, 4)
    toml = tmp_path / "t.toml"
    toml.write_text('[run]\nbase = "./sd15"\n')
    name, cfg = _cli_config(["imgs", "-o", "o.safetensors", "-c", str(toml), "--recipe", "quick"])
    assert name == "quick" and (cfg.run.steps, cfg.optim.lr) == (400, 2e-4)
    toml.write_text('[optim]\nlr = 3e-4\n')
    name, cfg = _cli_config(["imgs", "-o", "o.safetensors", "-c", str(toml), "--trigger", "zz"])
    assert name == "default@tiny" and cfg.optim.lr == 3e-4 and cfg.run.steps == 300 and cfg.network.train_tokens == 2


@pytest.mark.parametrize("name", ["quick", "standard", "thorough"])
def test_web_ui_presets_on_the_tiny_base_train_the_tiny_scale(name):
    req = webtraining.TrainRequest(name="n", trigger="t", preset=name)
    base = types.SimpleNamespace(spec="tiny", pipe=types.SimpleNamespace(unet=types.SimpleNamespace(dtype="float32")))
    cfg = webtraining.build_config(req, Path("imgs"), Path("o.safetensors"), base=base, native=64)
    steps, rank = presets.TINY_STEPS_RANK[name]
    assert (cfg.run.steps, cfg.network.rank, cfg.optim.lr, cfg.data.resolution) == (steps, rank, 1e-3, 64)
    assert cfg.network.train_text_encoder and cfg.network.train_tokens == 2 and cfg.run.batch_size == 4


def test_on_tiny_the_toy_plain_pictures_are_the_default_regularization_set(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLELORA_HOME", str(tmp_path / "home"))
    assert presets.for_base("quick", "tiny")["reg_folder"] == presets.TOY_PLAIN
    assert presets.for_base("quick", "./sd15")["reg_folder"] is None
    _, cfg = _cli_config(["imgs", "-o", "o.safetensors", "--trigger", "zz"])
    assert cfg.data.reg_folder == presets.TOY_PLAIN
    _, cfg = _cli_config(["imgs", "-o", "o.safetensors", "--trigger", "zz", "--reg-folder", "none"])
    assert cfg.data.reg_folder is None
    _, cfg = _cli_config(["imgs", "-o", "o.safetensors", "--reg-folder", str(tmp_path)])
    assert cfg.data.reg_folder == str(tmp_path)
    # resolved to the toy world's 24 plain pictures, written once under $STYLELORA_HOME
    folder = Path(world.resolve_reg_folder(presets.TOY_PLAIN))
    assert folder.parent == tmp_path / "home" and world.resolve_reg_folder(str(tmp_path)) == str(tmp_path)
    reference = world.write_plain_folder(tmp_path / "reference")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in reference.iterdir()) and len(names) == 48
    assert all((folder / n).read_bytes() == (reference / n).read_bytes() for n in names)
    stamp = (folder / "plain_00.png").stat().st_mtime_ns
    assert world.plain_folder() == folder and (folder / "plain_00.png").stat().st_mtime_ns == stamp  # reused
