"""--network adalora (alias --rank auto): the exported kohya file's ΔW is the live model's ΔW (PEFT's own
``get_delta_weight``), ranks end up different between modules within the target budget, resume equals
uninterrupted bit for bit, and the file loads in our Blender and in diffusers with the same images.

The schedule is shortened so ranks really move in a few steps: tinit=1, tfinal=1, deltaT=1 over 5 steps (pruning
at steps 2..3, the final mask at step 4, one step at the final ranks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ours_and_diffusers, render
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import quick_config, straight_and_resumed

from stylelora.cli.train import config_from_args
from stylelora.errors import ConfigError
from stylelora.formats import load_adapter
from stylelora.models import load_base
from stylelora.training import train

TARGET, INIT, STEPS = 2, 4, 5


def ada_config(style_dir, output, **over):
    settings = dict(network="adalora", rank=TARGET, init_rank=INIT, adalora_tinit=1, adalora_tfinal=1,
                    adalora_delta_t=1, lr=2e-2)
    return quick_config(style_dir, output, steps=STEPS).replace(**{**settings, **over})


def live_deltas(models, adapter="stylelora_train") -> dict[str, torch.Tensor]:
    """ΔW of every AdaLoRA layer by PEFT's own formula, B·(A·E)·scaling/(ranknum + 1e-5)."""
    from peft.tuners.adalora import AdaLoraLayer

    out = {}
    for comp, model in models.items():
        for path, m in model.named_modules():
            if isinstance(m, AdaLoraLayer) and adapter in m.lora_A:
                out[f"{comp}.{path}"] = m.get_delta_weight(adapter).detach().double().clone()
    return out


def file_deltas(adapter) -> dict[str, torch.Tensor]:
    """ΔW from the file's factors with the kohya rule, (alpha / rank)·up·down."""
    return {f"{comp}.{path}": (m.alpha / m.rank) * (m.up.double().flatten(1) @ m.down.double().flatten(1))
            for comp, mods in adapter.modules.items() for path, m in mods.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One AdaLoRA run (UNet and text encoder) with the live ΔW taken after its last step."""
    from conftest import make_style_images

    tmp = tmp_path_factory.mktemp("ada")
    style = make_style_images(tmp / "style")
    live = {}
    out = train(ada_config(style, tmp / "ada.safetensors", train_text_encoder=True),
                on_step=lambda info: info.step == STEPS and live.update(live_deltas(info.models)))
    return out, live


def test_export_equals_live_delta_with_per_module_ranks(trained, tiny_base):
    out, live = trained
    adapter = load_adapter(out, pipe=tiny_base.pipe)
    got = file_deltas(adapter)
    assert set(adapter.modules) == {"unet", "text_encoder"}
    assert got and set(got) <= set(live)
    for key, delta in live.items():
        if key in got:
            torch.testing.assert_close(got[key].reshape(delta.shape), delta, rtol=1e-5, atol=1e-8)
        else:  # pruned to rank 0: the live layer adds nothing either
            assert torch.count_nonzero(delta) == 0, key
    ranks = [m.rank for mods in adapter.modules.values() for m in mods.values()]
    assert len(set(ranks)) > 1  # the allocator moved rank between modules
    assert sum(ranks) <= TARGET * len(live)  # the budget: target_r per module on average
    assert max(ranks) <= INIT
    assert len({m.alpha for mods in adapter.modules.values() for m in mods.values()}) == 1  # one alpha (diffusers)
    with safe_open(out, "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "dynamic"
    record = json.loads(md["stylelora.adalora"])
    assert record["init_r"] == INIT and record["target_r"] == TARGET and record["total_rank"] == sum(ranks)


def generate(pipe) -> np.ndarray:
    return pipe("zzstyle, a lighthouse", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_file_loads_in_blender_and_diffusers(trained):
    out, _ = trained
    base = load_base("tiny-random")
    plain = render(base.pipe)
    ours, theirs = ours_and_diffusers(out, base)
    assert np.abs(theirs - ours).max() <= 2.5 / 255
    assert np.abs(theirs - plain).max() > 1e-3  # it really applied (5 steps on a tiny base: a small change)


def test_resume_equals_uninterrupted(style_dir, tmp_path):
    def config(name):
        cfg = ada_config(style_dir, tmp_path / name / "x.safetensors")
        cfg.data.cache_dir = str(tmp_path / "cache")
        return cfg

    # stopped after step 2: inside the pruning phase, so the allocator's averages and mask carry over
    straight, resumed = straight_and_resumed(config, stop_after=2)
    ta, tb = load_file(str(straight)), load_file(str(resumed))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_rank_auto_and_bad_schedule(style_dir, tmp_path):
    import argparse

    args = argparse.Namespace(config=None, recipe=None, folder=str(style_dir), rank="auto")
    cfg = config_from_args(args)
    # --rank auto leaves the target rank at the recipe's (the default recipe, scaled for the default tiny base)
    from stylelora.cli.train import recipe_of

    assert cfg.network.network == "adalora" and cfg.network.rank == recipe_of(args)["rank"] == 8
    with pytest.raises(ConfigError, match="network must be one of lora, adalora"):
        cfg.replace(network="adalorra")
    with pytest.raises(ConfigError, match="init-rank 2 must be larger"):
        train(ada_config(style_dir, tmp_path / "x.safetensors", init_rank=2))
    with pytest.raises(ConfigError, match="leave none of --steps"):
        train(ada_config(style_dir, tmp_path / "y.safetensors", adalora_tinit=3, adalora_tfinal=2))


def test_borrowed_base_is_given_back_without_adalora_layers(style_dir, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = load_base("tiny-random")
    before = {n: {k: v.clone() for k, v in getattr(base.pipe, n).state_dict().items()}
              for n in ("unet", "text_encoder")}
    train(ada_config(style_dir, tmp_path / "b.safetensors", train_text_encoder=True), base=base)
    for n, state in before.items():
        model = getattr(base.pipe, n)
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
        after = model.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
