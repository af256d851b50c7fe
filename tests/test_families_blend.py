"""Every family through the rest of the tool: blend, merge, bake, inspect, single-file bases; mixing refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stylelora import Blender
from stylelora.config import DataConfig, NetworkConfig, RunConfig, TrainConfig
from stylelora.errors import AdapterError
from stylelora.formats import describe, load_adapter
from stylelora.merge import merge
from stylelora.models import load_base
from stylelora.training import train


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two-step adapters trained on the tiny SDXL, SD2-v and SD1 bases (UNet + text encoders)."""
    from conftest import make_style_images

    root = tmp_path_factory.mktemp("fam")
    images = make_style_images(root / "imgs", 2)
    out = {}
    for spec in ("tiny-sdxl", "tiny-sd2-v", "tiny-random"):
        cfg = TrainConfig(data=DataConfig(folder=str(images), trigger="zz", resolution=128, cache_dir=str(root / "c")),
                          network=NetworkConfig(rank=4, train_text_encoder=True),
                          run=RunConfig(base=spec, output=str(root / f"{spec}.safetensors"), steps=2, batch_size=2))
        cfg.optim.lr = 5e-2
        out[spec] = train(cfg)
    return out


def render(pipe, seed=5):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return pipe("zz, a circle", num_inference_steps=3, height=128, width=128, generator=g, output_type="np").images[0]


@pytest.mark.parametrize("spec", ["tiny-sdxl", "tiny-sd2-v"])
def test_fused_blend_matches_diffusers_and_restores(adapters, spec):
    base = load_base(spec)
    plain = render(base.pipe)
    blender = Blender(base)
    name = blender.load(adapters[spec])
    blender.set({name: 1.0})
    fused = render(base.pipe)
    theirs = load_base(spec).pipe
    theirs.load_lora_weights(str(adapters[spec]))
    assert np.abs(fused - render(theirs)).max() <= 1 / 255
    assert np.abs(fused - plain).max() > 2 / 255
    blender.set({name: 0.0})
    assert np.array_equal(render(base.pipe), plain)


def test_mixing_families_is_refused(adapters):
    sd1 = Blender(load_base("tiny-random"))
    with pytest.raises(AdapterError, match="(?i)sdxl"):
        sd1.load(adapters["tiny-sdxl"])
    xl = Blender(load_base("tiny-sdxl"))
    with pytest.raises(AdapterError, match="(?i)sd1"):
        xl.load(adapters["tiny-random"])
    with pytest.raises(Exception, match="(?i)famil"):
        merge([(load_adapter(adapters["tiny-random"], pipe=load_base("tiny-random").pipe), 0.5),
               (load_adapter(adapters["tiny-sdxl"], pipe=load_base("tiny-sdxl").pipe), 0.5)])


def test_sdxl_merge_equals_blend(adapters):
    base = load_base("tiny-sdxl")
    a = load_adapter(adapters["tiny-sdxl"], pipe=base.pipe)
    result = merge([(a, 0.6), (a, -0.2)])
    merged = result.adapter if hasattr(result, "adapter") else result[0]
    blender = Blender(base)
    blender.load(merged, name="m")
    blender.set({"m": 1.0})
    merged_img = render(base.pipe)
    blender.unload("m")
    blender.load(a, name="a")
    blender.set({"a": 0.4})
    assert np.abs(render(base.pipe) - merged_img).max() < 1e-4


def test_inspect_reports_each_family(adapters):
    assert describe(adapters["tiny-sdxl"])["family"] == "sdxl"
    assert describe(adapters["tiny-sd2-v"])["family"] == "sd2-v"
    comps = describe(adapters["tiny-sdxl"])["components"]
    assert set(comps) == {"unet", "text_encoder", "text_encoder_2"}


def test_single_file_checkpoint_as_training_base(adapters, tmp_path):
    """A single .safetensors checkpoint (ldm layout, written by bake --single-file) loads as --base with a config."""
    from stylelora.bake import bake
    from stylelora.models import ensure_tiny
    from stylelora.prompt import parse_spec

    base = load_base("tiny-random")
    ckpt = bake(base, [parse_spec(f"{adapters['tiny-random']}:0.5")], tmp_path / "baked.safetensors", single_file=True)
    loaded = load_base(str(ckpt), base_config=str(ensure_tiny("tiny-random")))
    assert loaded.family.key == "sd1" and loaded.name == "baked"
    blended = Blender(load_base("tiny-random"))
    blended.set({blended.load(adapters["tiny-random"]): 0.5})
    assert np.abs(render(loaded.pipe) - render(blended.pipe)).max() < 1e-4
    meta = json.loads(__import__("safetensors").safe_open(str(ckpt), "pt").metadata()["stylelora_baked_from"])
    assert meta[0]["weight"] == 0.5
