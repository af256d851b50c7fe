"""--network dora and --network locon: what training writes is what the live model computed.

DoRA, both magnitude layouts: the kohya file (``dora_scale``) fused by our Blender gives, layer by layer, the
weight the live PEFT layer used in its forward after the last step (read by feeding it the identity matrix, so the
reference is the layer's own forward, not our formula). The PEFT-layout file (``lora_magnitude_vector``) renders in
diffusers like our blend. Resume equals an uninterrupted run bit for bit. LoCon: the conv LoRA pairs are kohya LoCon
keys with each layer's live ΔW (PEFT's ``get_delta_weight``), and the file renders in diffusers like our blend.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import make_style_images, ours_and_diffusers, render
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import quick_config, straight_and_resumed

from stylelora.errors import ConfigError
from stylelora.models import load_base
from stylelora.training import ADAPTER_NAME, train

STEPS = 3


def dora_config(style, output, **over):
    return quick_config(style, output, steps=STEPS).replace(**{"network": "dora", "lr": 2e-2, **over})


def live_weights(models) -> dict[str, torch.Tensor]:
    """The weight each LoRA-wrapped Linear layer applies now: its forward on the identity matrix, bias removed."""
    from peft.tuners.lora import LoraLayer

    out = {}
    with torch.no_grad():
        for comp, model in models.items():
            for path, layer in model.named_modules():
                if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A:
                    base = layer.get_base_layer()
                    n = base.weight.shape[1]
                    eye = torch.eye(n, dtype=base.weight.dtype, device=base.weight.device)
                    if isinstance(base, torch.nn.Conv2d):  # a 1x1 conv: one-hot 1x1 images, one per input channel
                        assert base.kernel_size == (1, 1), path
                        y = layer(eye.reshape(n, n, 1, 1)).flatten(1)
                    else:
                        y = layer(eye)
                    if base.bias is not None:
                        y = y - base.bias
                    out[f"{comp}.{path}"] = y.T.reshape(base.weight.shape).double().cpu().clone()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One DoRA run per layout (UNet and text encoder), with the live weights after the last step."""
    tmp = tmp_path_factory.mktemp("dora")
    style = make_style_images(tmp / "style")
    done = {}
    # SDXL: both text encoders, ldm UNet names; conv: SD1's 1x1 proj_in/proj_out convolutions as targets too
    for case in ("in", "out", "in-sdxl", "in-conv", "out-conv"):
        live = {}
        layout, _, variant = case.partition("-")
        extra = {"sdxl": {"base": "tiny-sdxl"},
                 "conv": {"unet_targets": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]}}
        cfg = dora_config(style, tmp / f"{case}.safetensors", dora_layout=layout, train_text_encoder=True,
                          **extra.get(variant, {}))
        out = train(cfg, on_step=lambda info, live=live: info.step == STEPS and live.update(live_weights(info.models)))
        done[case] = (out, live)
    return done


@pytest.mark.parametrize("case", ["in", "out", "in-sdxl", "in-conv", "out-conv"])
def test_kohya_file_fused_equals_live_dora_weights(runs, case):
    from stylelora.blend import Blender
    from stylelora.formats import load_adapter

    out, live = runs[case]
    layout, _, variant = case.partition("-")
    family = variant == "sdxl"
    tensors = load_file(str(out))
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == len(live) > 0
    for k, v in scales.items():  # the layout asked for: [1, in] (kohya/A1111) or [out, 1] (LyCORIS wd_on_out)
        down = tensors[k.replace("dora_scale", "lora_down.weight")]
        up = tensors[k.replace("dora_scale", "lora_up.weight")]
        ones = (1,) * (down.dim() - 2)  # [1, in(, 1, 1)] or [out, 1(, 1, 1)]
        assert tuple(v.shape) == ((1, down.shape[1], *ones) if layout == "in" else (up.shape[0], 1, *ones)), k
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["stylelora.format"] == "kohya" and md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_out": str(layout == "out")}

    base = load_base("tiny-sdxl" if family else "tiny-random")
    assert {k.partition(".")[0] for k in live} == ({"unet", "text_encoder", "text_encoder_2"} if family else
                                                   {"unet", "text_encoder"})
    adapter = load_adapter(out, pipe=base.pipe)
    w0 = {key: _module(base.pipe, key).weight.detach().double().clone() for key in live}
    blender = Blender(base)
    blender.load(out, weight=1.0)
    rescaled = 0
    for key, want in live.items():
        got = _module(base.pipe, key).weight.detach().double()
        err = (got - want).norm() / want.norm()
        assert err <= 1e-5, (key, float(err))
        # the magnitude really moved the weight: W' differs from W0 + the plain LoRA update by far more than that
        comp, _, path = key.partition(".")
        m = adapter.modules[comp][path]
        assert m.dora_axis == layout
        up, down = m.tensors["up"].double().flatten(1), m.tensors["down"].double().flatten(1)
        plain = w0[key] + m.alpha / m.rank * (up @ down).reshape(w0[key].shape)
        rescaled += int((want - plain).norm() / want.norm() > 1e-3)
    assert rescaled > len(live) // 2
    assert (variant == "conv") == any(w.dim() == 4 for w in live.values())
    blender.reset()
    assert all(torch.equal(_module(base.pipe, k).weight.double(), w) for k, w in w0.items())


def _module(pipe, key: str):
    comp, _, path = key.partition(".")
    return getattr(pipe, comp).get_submodule(path)


def test_peft_format_renders_in_diffusers_like_our_blend(tmp_path):
    style = make_style_images(tmp_path / "style")
    out = train(dora_config(style, tmp_path / "p.safetensors", dora_layout="out", format="peft"))
    keys = load_file(str(out)).keys()
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert not any("dora_scale" in k for k in keys)
    base = load_base("tiny-random")
    plain = render(base.pipe)
    ours, theirs = ours_and_diffusers(out, base)
    assert np.abs(theirs - ours).max() <= 2.5 / 255
    assert np.abs(theirs - plain).max() > 1e-3  # it really applied

    # weight by weight: diffusers loads PEFT DoRA layers, and PEFT's own merge equals our fused blend
    from peft.tuners.lora import LoraLayer

    from stylelora.blend import Blender

    pipe = load_base("tiny-random").pipe
    pipe.load_lora_weights(str(out))
    layers = [(path, m) for path, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    assert layers and all(any(m.use_dora.values()) for _, m in layers)
    pipe.fuse_lora()
    blender = Blender(base)
    blender.load(out, weight=1.0)
    for path, _ in layers:
        want = pipe.unet.get_submodule(path).get_base_layer().weight.detach().double()
        got = base.pipe.unet.get_submodule(path).weight.detach().double()
        assert (got - want).norm() / want.norm() <= 1e-5, path
    blender.reset()


@pytest.mark.parametrize("layout", ["in", "out"])
def test_dora_resume_equals_uninterrupted(style_dir, tmp_path, layout):
    def config(name):
        cfg = dora_config(style_dir, tmp_path / name / "x.safetensors", steps=4, dora_layout=layout)
        cfg.data.cache_dir = str(tmp_path / "cache")
        return cfg

    straight, resumed = straight_and_resumed(config)
    ta, tb = load_file(str(straight)), load_file(str(resumed))
    assert ta.keys() == tb.keys() and any(k.endswith("dora_scale") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_locon_file_is_kohya_locon_with_the_live_deltas_and_renders_in_diffusers(tmp_path):
    from peft.tuners.lora import LoraLayer

    from stylelora.formats import load_adapter

    style = make_style_images(tmp_path / "style")
    live = {}

    def grab(info):
        if info.step == 2:
            for path, layer in info.models["unet"].named_modules():
                if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A:
                    live[path] = layer.get_delta_weight(ADAPTER_NAME).detach().double().clone()

    cfg = quick_config(style, tmp_path / "c.safetensors", steps=2).replace(network="locon", conv_rank=2,
                                                                            conv_alpha=1.0, lr=2e-2)
    out = train(cfg, on_step=grab)
    tensors = load_file(str(out))
    convs = {k: v for k, v in tensors.items() if k.endswith("lora_down.weight") and v.dim() == 4}
    assert any("_resnets_" in k and k.endswith("conv1.lora_down.weight") for k in convs)
    assert any("_downsamplers_0_conv." in k for k in convs) and any("_upsamplers_0_conv." in k for k in convs)
    for k, down in convs.items():
        up = tensors[k.replace("lora_down", "lora_up")]
        kernel = tuple(down.shape[2:])
        assert tuple(up.shape[2:]) == (1, 1), k  # LoCon: the kernel in lora_down, a 1x1 lora_up
        assert down.shape[0] == (2 if kernel != (1, 1) else 4), k  # conv_rank on 3x3, rank on 1x1
        assert float(tensors[k.replace("lora_down.weight", "alpha")]) == (1.0 if kernel != (1, 1) else 4.0)
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert '"conv_dim": "2"' in md["ss_network_args"] and '"conv_alpha": "1.0"' in md["ss_network_args"]

    base = load_base("tiny-random")
    adapter = load_adapter(out, pipe=base.pipe)
    assert set(adapter.modules["unet"]) == set(live)
    for path, delta in live.items():
        got = adapter.modules["unet"][path].delta(torch.float64)
        torch.testing.assert_close(got.reshape(delta.shape), delta, rtol=1e-5, atol=1e-9)
    plain = render(base.pipe)
    ours, theirs = ours_and_diffusers(out, base)
    assert np.abs(theirs - ours).max() <= 2.5 / 255
    assert np.abs(theirs - plain).max() > 1e-3
    pipe = load_base("tiny-random").pipe  # diffusers really placed the conv pairs (none was dropped)
    pipe.load_lora_weights(str(out))
    placed = {path for path, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert placed == set(live)


def test_settings_that_do_not_go_together(style_dir, tmp_path):
    cfg = quick_config(style_dir, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="dora_layout out"):
        cfg.replace(network="dora", format="peft")
    cfg.replace(network="dora", format="peft", dora_layout="out")  # fine
    with pytest.raises(ConfigError, match="add --network locon"):
        cfg.replace(conv_rank=4)
    with pytest.raises(ConfigError, match="dora_layout must be in or out"):
        cfg.replace(network="dora", dora_layout="rows")
    with pytest.raises(ConfigError, match="network dora needs a full-precision base"):
        cfg.replace(network="dora", quantize_base="fp8")


def test_cli_flags(style_dir):
    from stylelora.cli.train import config_from_args

    args = argparse.Namespace(config=None, recipe=None, folder=str(style_dir), network="locon", conv_rank=8,
                              conv_alpha=4.0)
    net = config_from_args(args).network
    assert (net.network, net.conv_lora_rank, net.conv_lora_alpha) == ("locon", 8, 4.0)
    args = argparse.Namespace(config=None, recipe=None, folder=str(style_dir), network="dora", dora_layout="out")
    net = config_from_args(args).network
    assert (net.network, net.dora_layout) == ("dora", "out")


def test_borrowed_base_is_given_back_without_dora_layers(style_dir, tmp_path):
    """The input-axis magnitude lives on PEFT's layer (with its forward hook): removing the layers removes it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = load_base("tiny-random")
    before = {n: {k: v.clone() for k, v in getattr(base.pipe, n).state_dict().items()}
              for n in ("unet", "text_encoder")}
    plain = render(base.pipe)
    train(dora_config(style_dir, tmp_path / "b.safetensors", steps=1, train_text_encoder=True), base=base)
    for n, state in before.items():
        model = getattr(base.pipe, n)
        assert not any(isinstance(m, BaseTunerLayer) or m._forward_pre_hooks for m in model.modules())
        after = model.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert np.array_equal(render(base.pipe), plain)


@pytest.mark.parametrize("layout", ["in", "out"])
def test_inspect_readers_diffusers_verdicts_hold_in_diffusers(runs, tmp_path, layout):
    """What inspect says of diffusers, checked against diffusers itself: a kohya DoRA file loads as a plain LoRA
    (dora_scale dropped), a kohya LoHa file is refused."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    from stylelora.formats import describe

    out, live = runs[layout]
    assert describe(out, hashes=False)["readers"]["diffusers"] == "as plain LoRA"
    pipe = load_base("tiny-random").pipe
    pipe.load_lora_weights(str(out))
    layers = [m for _, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == sum(k.startswith("unet.") for k in live) and not any(any(m.use_dora.values()) for m in layers)

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    o, i = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.get_base_layer().weight.shape
    loha = {f"{name}.hada_w1_a": torch.randn(o, 2), f"{name}.hada_w1_b": torch.randn(2, i),
            f"{name}.hada_w2_a": torch.randn(o, 2), f"{name}.hada_w2_b": torch.randn(2, i),
            f"{name}.alpha": torch.tensor(2.0)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    assert describe(tmp_path / "loha.safetensors", hashes=False)["readers"]["diffusers"] == "no"
    with pytest.raises(ValueError, match="not been correctly renamed"):
        load_base("tiny-random").pipe.load_lora_weights(str(tmp_path / "loha.safetensors"))


def test_convert_output_axis_kohya_dora_to_peft_and_back(runs, tmp_path, capsys):
    """convert --to peft of an output-axis DoRA file: the same modules (factors, alpha, magnitude) read back, and
    diffusers builds PEFT DoRA layers from it; an input-axis file is refused naming the layout."""
    from peft.tuners.lora import LoraLayer

    from stylelora.cli import main
    from stylelora.formats import load_adapter

    base = load_base("tiny-random")
    out, _ = runs["out"]
    peft_file = tmp_path / "p.safetensors"
    assert main(["convert", str(out), "--to", "peft", "-o", str(peft_file)]) == 0
    a, b = load_adapter(out, pipe=base.pipe), load_adapter(peft_file, pipe=base.pipe)
    assert a.modules.keys() == b.modules.keys()
    for comp, mods in a.modules.items():
        assert mods.keys() == b.modules[comp].keys()
        for path, m in mods.items():
            n = b.modules[comp][path]
            assert (n.kind, n.dora_axis, n.alpha) == (m.kind, m.dora_axis, m.alpha) == ("lora", "out", m.alpha)
            for role in ("down", "up"):
                assert torch.equal(n.tensors[role], m.tensors[role]), (path, role)
            assert torch.equal(n.tensors["dora_scale"].flatten(), m.tensors["dora_scale"].flatten()), path
    pipe = load_base("tiny-random").pipe
    pipe.load_lora_weights(str(peft_file))
    assert all(any(m.use_dora.values()) for _, m in pipe.unet.named_modules() if isinstance(m, LoraLayer))
    capsys.readouterr()
    assert main(["convert", str(runs["in"][0]), "--to", "peft", "-o", str(tmp_path / "q.safetensors")]) != 0
    assert "per input column" in capsys.readouterr().err


def test_sdxl_locon_file_has_ldm_names_and_renders_in_diffusers(tmp_path):
    """On SDXL the UNet keys are kohya's ldm names (in_layers_2, out_layers_3, emb_layers_1, skip_connection, op),
    which diffusers' converter maps back: the same images as our blend."""
    from peft.tuners.lora import LoraLayer

    style = make_style_images(tmp_path / "style")
    cfg = quick_config(style, tmp_path / "x.safetensors", steps=2, base="tiny-sdxl")
    out = train(cfg.replace(network="locon", conv_rank=2, lr=2e-2))
    keys = {k.rsplit(".", 2)[0] for k in load_file(str(out)) if k.endswith("lora_down.weight")}
    for part in ("_in_layers_2", "_out_layers_3", "_emb_layers_1", "_0_op"):
        assert any(k.endswith(part) for k in keys), part
    assert not any("resnets" in k or "downsamplers" in k for k in keys)
    base = load_base("tiny-sdxl")
    plain = render(base.pipe)
    ours, theirs = ours_and_diffusers(out, base, "tiny-sdxl")
    assert np.abs(theirs - ours).max() <= 2.5 / 255
    assert np.abs(theirs - plain).max() > 1e-3
    pipe = load_base("tiny-sdxl").pipe
    pipe.load_lora_weights(str(out))
    assert sum(isinstance(m, LoraLayer) for m in pipe.unet.modules()) == len(keys)
