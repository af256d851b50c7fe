"""Configs are checked on creation, on every later assignment and on ``replace``; recipes layer under TOML and flags."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from stylelora.config import DataConfig, NetworkConfig, OptimConfig, RunConfig, TrainConfig
from stylelora.errors import ConfigError


@pytest.mark.parametrize("section, key, bad", [
    ("network", "rank", 0), ("network", "rank", 2000), ("optim", "lr", -1.0), ("optim", "lr_scheduler", "sometimes"),
    ("data", "resolution", 100), ("data", "caption_dropout", 1.0), ("run", "steps", 0), ("run", "format", "ckpt"),
    ("run", "steps", "5"),  # a string where a number belongs
])
def test_invalid_assignment_after_creation_raises_and_keeps_the_old_value(section, key, bad):
    cfg = TrainConfig()
    before = cfg.to_dict()
    with pytest.raises(ConfigError, match=key):
        setattr(getattr(cfg, section), key, bad)
    assert cfg.to_dict() == before


def test_valid_assignment_is_applied_and_rechecked_against_other_fields():
    cfg = TrainConfig()
    cfg.optim.lr = 5e-2
    cfg.network.train_text_encoder = True
    cfg.network.unet_targets = []  # allowed: the text encoder still trains
    assert (cfg.optim.lr, cfg.network.unet_targets) == (5e-2, [])
    with pytest.raises(ConfigError, match="nothing to train"):
        cfg.network.train_text_encoder = False  # now nothing would train: a check across fields
    assert cfg.network.train_text_encoder is True
    cfg.data.bucket_step = 32
    with pytest.raises(ConfigError, match="multiple of bucket_step"):
        cfg.data.resolution = 80  # 80 is a multiple of 16 but not of 32
    cfg.optim.min_snr_gamma = 0  # 0 means off, as on creation
    assert cfg.optim.min_snr_gamma is None and OptimConfig(min_snr_gamma=0).min_snr_gamma is None


def test_misspelled_fields_and_wrong_sections_are_refused():
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match="no field 'step'"):
        cfg.run.step = 10  # would otherwise add an attribute that training never reads
    with pytest.raises(ConfigError, match="network must be a NetworkConfig"):
        cfg.network = OptimConfig()


@pytest.mark.parametrize("bad", [{"rank": 0}, {"lr": 0.0}, {"resolution": 65}, {"steps": -1}, {"bogus": 1}])
def test_replace_with_invalid_values_raises(bad):
    with pytest.raises(ConfigError):
        TrainConfig().replace(**bad)


def test_dataclasses_replace_and_copies_are_checked_too():
    with pytest.raises(ConfigError, match="rank"):
        dataclasses.replace(NetworkConfig(), rank=0)
    cfg = TrainConfig(data=DataConfig(folder="imgs"), run=RunConfig(output="a.safetensors"))
    for other in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert other == cfg
        with pytest.raises(ConfigError, match="steps"):
            other.run.steps = 0


def test_flat_get_reads_the_owning_section():
    cfg = TrainConfig().replace(rank=4, lr=3e-4, folder="x")
    assert (cfg.get("rank"), cfg.get("lr"), cfg.get("folder")) == (cfg.network.rank, cfg.optim.lr, cfg.data.folder)
    assert (cfg.network.rank, cfg.optim.lr, cfg.data.folder) == (4, 3e-4, "x")
    with pytest.raises(ConfigError, match="unknown option"):
        cfg.get("nope")


def test_cli_recipe_then_toml_then_flags(tmp_path):
    from stylelora.cli import build_parser
    from stylelora.cli.train import config_from_args

    toml = tmp_path / "t.toml"
    toml.write_text('[optim]\nlr = 3e-4\n[network]\nrank = 12\n[run]\nbase = "./sd15"\n')  # a real base: the
    # recipes' own numbers (on the toy `tiny` base they are scaled: tests/test_presets.py)
    args = build_parser().parse_args(["train", "imgs", "--recipe", "quick", "-c", str(toml), "--rank", "4"])
    cfg = config_from_args(args)
    # quick is 400 steps, rank 8, lr 2e-4: the TOML's lr and the flag's rank win, the recipe's steps stay
    assert (cfg.run.steps, cfg.optim.lr, cfg.network.rank, cfg.data.folder) == (400, 3e-4, 4, "imgs")
    plain = config_from_args(build_parser().parse_args(["train", "imgs", "-c", str(toml)]))
    assert (plain.run.steps, plain.optim.lr, plain.network.rank) == (1000, 3e-4, 12)  # no recipe: the defaults
