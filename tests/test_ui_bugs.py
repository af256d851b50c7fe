"""Bugs a new user found (issue #20): each test failed before its fix."""

from __future__ import annotations

import pytest
from PIL import Image

from stylelora.errors import ConfigError
from stylelora.webui import GridRequest
from stylelora.webui.handlers import MAX_CELLS, parse_values
from test_webui_handlers import request, studio  # noqa: F401  (the module-scoped Studio fixture)


def test_grid_with_no_y_axis_finishes(studio):  # noqa: F811
    # was: TypeError "unsupported format string passed to NoneType.__format__" after rendering every cell
    res = studio.grid(GridRequest(request(), "ink", [0.0, 1.0], "none", None, []))
    assert len(res.cells) == 2
    assert "X/Y grid: X ink weight 0, 1; Y none" in Image.open(res.path).info["parameters"]


def test_grid_size_message_counts_every_value(studio):  # noqa: F811
    # 0:100:0.5 has (100 - 0) / 0.5 + 1 = 201 values; with 2 seeds that is 402 images (was reported as 130)
    assert len(parse_values("0:100:0.5")) == 201
    with pytest.raises(ConfigError, match=f"402 images; at most {MAX_CELLS}"):
        studio.grid(GridRequest(request(), "ink", parse_values("0:100:0.5"), "seed", None, [1, 2]))


def test_sample_prompts_are_one_per_flag_or_line():
    from stylelora.cli import build_parser
    from stylelora.cli.train import config_from_args

    def prompts(*argv):
        return config_from_args(build_parser().parse_args(["train", "imgs", *argv])).run.sample_prompts

    # was: split on commas into three prompts
    assert prompts("--sample-prompts", "pastl, a small blue square, red") == ["pastl, a small blue square, red"]
    assert prompts("--sample-prompts", "pastl, a tree", "--sample-prompts", "a house") == ["pastl, a tree", "a house"]
    assert prompts("--sample-prompts", "pastl, a tree\na house, at dusk\n") == ["pastl, a tree", "a house, at dusk"]


def test_sample_pngs_carry_a_parameters_chunk(tiny_base, tmp_path):
    from accelerate import Accelerator

    from stylelora.config import TrainConfig
    from stylelora.generate import parse_infotext
    from stylelora.training import write_samples

    cfg = TrainConfig().replace(folder="x", trigger="zzstyle", resolution=64, base="tiny-random",
                                sample_prompts=["zzstyle, a tree"], sample_steps=2, sample_seed=5)
    [path] = write_samples(tiny_base.pipe, cfg, tmp_path / "a.safetensors", 7, Accelerator(cpu=True),
                           return_paths=True)
    text = Image.open(path).info["parameters"]
    assert text.splitlines()[0] == "zzstyle, a tree"
    fields = parse_infotext(text)
    assert (fields["Steps"], fields["Seed"], fields["Size"], fields["Training step"]) == ("2", "5", "64x64", "7")
