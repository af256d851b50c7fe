"""A quantized frozen base (issue #18): fp8 layers against reference math, training on it (only LoRA trains, resume
bit-exact), its adapters on a full base and in diffusers, blending into it, and the bitsandbytes modes (GPU)."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ours_and_diffusers, render
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import quick_config, straight_and_resumed

from stylelora import quantize
from stylelora.adapter import Adapter, LoraModule
from stylelora.blend import Blender
from stylelora.errors import ConfigError
from stylelora.models import load_base
from stylelora.training import train

E4M3_MANTISSA_BITS = 3
E4M3_MIN_SUBNORMAL = 2.0 ** -9  # of the values q (before the scale)


def unet_inputs(unet, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, unet.config.in_channels, 16, 16, generator=g)
    t = torch.linspace(10, 990, n).long()
    c = torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)
    return x, t, c


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ the fp8 layers
def test_quantize_fp8_rounds_each_weight_to_the_nearest_e4m3_step():
    """|W - q·s| is at most half an e4m3 step of the value (3 mantissa bits), or half the smallest subnormal step."""
    w = torch.randn(16, 40) * torch.logspace(-4, 0, 16)[:, None]  # channels of very different magnitudes
    w[3] = 0.0
    q, scale = quantize.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (16, 1) and scale[3] == 1.0
    back = quantize.dequantize_fp8(q, scale, torch.float32)
    # each channel's largest magnitude maps to e4m3's largest finite value (448)
    assert torch.allclose((w.abs().amax(1) / scale[:, 0])[w.abs().amax(1) > 0], torch.tensor(448.0))
    bound = torch.maximum(w.abs() / scale * 2.0 ** -(E4M3_MANTISSA_BITS + 1),
                          torch.tensor(E4M3_MIN_SUBNORMAL / 2)) * scale
    assert ((w - back).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(back[3], torch.zeros(40))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fp8_layer_forward_and_input_gradient_equal_the_dequantized_reference(kind):
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 7) if kind == "linear" else torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
    x = torch.randn(3, 12) if kind == "linear" else torch.randn(2, 6, 9, 9)
    q, scale = quantize.quantize_fp8(layer.weight)
    w_ref, b_ref = quantize.dequantize_fp8(q, scale, torch.float32), layer.bias.detach().clone()
    assert quantize.quantize_module_fp8(layer) == 1 and "weight" not in dict(layer.named_parameters())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(x1)
    ref = F.linear(x2, w_ref, b_ref) if kind == "linear" else F.conv2d(x2, w_ref, b_ref, stride=2, padding=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.weight, w_ref, rtol=0, atol=0)  # what PEFT and the Blender read


def test_to_dtype_keeps_fp8_storage_and_sets_the_compute_dtype():
    layer = torch.nn.Linear(8, 4)
    quantize.quantize_module_fp8(layer)
    q = layer.weight_fp8.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and torch.equal(layer.weight_fp8.float(), q.float())
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer.weight.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ a quantized base
@pytest.fixture(scope="module")
def full_and_fp8():
    return load_base("tiny"), load_base("tiny", quantize="fp8")


# Measured 3.5% on the pretrained tiny base (fixed inputs, 4 timesteps); an fp8 weight alone is off by up to 6%.
FP8_UNET_TOLERANCE = 0.06


def test_fp8_base_unet_output_within_tolerance_of_the_full_base(full_and_fp8):
    full, fp8 = full_and_fp8
    assert full.quantize is None and fp8.quantize == "fp8" and quantize.quantization(fp8.pipe) == "fp8"
    x, t, c = unet_inputs(full.pipe.unet)
    with torch.no_grad():
        ref, out = full.pipe.unet(x, t, c).sample, fp8.pipe.unet(x, t, c).sample
    err = rel(out, ref)
    assert 0 < err < FP8_UNET_TOLERANCE
    # ...and the same for the text encoder
    ids = torch.randint(0, 500, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(fp8.pipe.text_encoder(ids)[0], full.pipe.text_encoder(ids)[0]) < FP8_UNET_TOLERANCE


def test_fp8_base_parameter_bytes_are_exact(full_and_fp8):
    """Each quantized layer: 1 byte per weight plus a 4-byte scale per output channel instead of 4 bytes a weight;
    the UNet's conv_in/conv_out, norms, embeddings and every bias unchanged."""
    full, fp8 = full_and_fp8
    for comp in ("unet", "text_encoder"):
        saved = 0
        for name, layer in getattr(fp8.pipe, comp).named_modules():
            if quantize.is_fp8(layer):
                n = layer.weight_fp8.numel()
                saved += 4 * n - (n + 4 * layer.weight_fp8.shape[0])
        assert saved > 0
        full_bytes = sum(p.numel() * 4 for p in getattr(full.pipe, comp).parameters()) + \
            sum(b.numel() * b.element_size() for b in getattr(full.pipe, comp).buffers())
        assert quantize.parameter_bytes(getattr(fp8.pipe, comp)) == full_bytes - saved
    assert not quantize.is_fp8(fp8.pipe.unet.conv_in) and not quantize.is_fp8(fp8.pipe.unet.conv_out)
    assert quantize.parameter_bytes(fp8.pipe.unet) < 0.3 * quantize.parameter_bytes(full.pipe.unet)


def test_training_on_fp8_base_changes_only_lora_parameters(style_dir, tmp_path):
    base = load_base("tiny-random", quantize="fp8")
    before = {n: {k: v.clone() for k, v in getattr(base.pipe, n).state_dict().items()}
              for n in ("unet", "text_encoder", "vae")}
    cfg = quick_config(style_dir, tmp_path / "q.safetensors", quantize_base="fp8")
    cfg.network.train_text_encoder = True
    seen = set()

    def on_step(info):
        for m in info.models.values():
            seen.update((p.dtype, p.requires_grad) for p in m.parameters())

    out = train(cfg, base=base, on_step=on_step)
    for n, sd in before.items():
        after = getattr(base.pipe, n).state_dict()
        assert after.keys() == sd.keys(), n
        for k, v in sd.items():
            assert torch.equal(after[k].float(), v.float()) and after[k].dtype == v.dtype, f"{n}.{k} changed"
    assert (torch.float32, True) in seen and all(dt == torch.float32 for dt, trains in seen if trains)
    tensors = load_file(str(out))
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert any("lora_up" in k and v.abs().sum() > 0 for k, v in tensors.items())
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["stylelora.quantize_base"] == "fp8"


def test_resume_equals_uninterrupted_on_fp8_base(style_dir, tmp_path):
    def config(name):
        cfg = quick_config(style_dir, tmp_path / name / "x.safetensors", steps=4, quantize_base="fp8").replace(lr=1e-3)
        cfg.data.cache_dir = str(tmp_path / "cache")
        return cfg

    straight, resumed = straight_and_resumed(config)
    ta, tb = load_file(str(straight)), load_file(str(resumed))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_gradient_checkpointing_on_fp8_base_gives_the_same_adapter(style_dir, tmp_path):
    """Checkpointing runs each fp8 layer's forward again in the backward: the same adapter, bit for bit."""
    outs = []
    for gc in (False, True):
        cfg = quick_config(style_dir, tmp_path / f"gc{gc}" / "a.safetensors", quantize_base="fp8",
                           gradient_checkpointing=gc)
        cfg.network.train_text_encoder = True
        outs.append(load_file(str(train(cfg))))
    assert outs[0].keys() == outs[1].keys() and outs[0]
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_fp8_adapter_loads_on_full_base_and_in_diffusers_with_a_warning(style_dir, tmp_path, caplog):
    cfg = quick_config(style_dir, tmp_path / "q.safetensors", steps=3, quantize_base="fp8").replace(lr=1e-2)
    out = train(cfg)
    base = load_base("tiny-random")
    with caplog.at_level(logging.WARNING, logger="stylelora.quantize"):
        ours, theirs = ours_and_diffusers(out, base)
    assert any("fp8-quantized base" in r.getMessage() and "full-precision" in r.getMessage() for r in caplog.records)
    assert np.abs(theirs - ours).max() <= 2.5 / 255
    assert np.abs(ours - render(base.pipe)).max() > 1 / 255  # it really applied
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stylelora.quantize"):
        Blender(load_base("tiny-random", quantize="fp8")).load(out)  # same precision: no warning
    assert not caplog.records


def test_blend_on_fp8_base_adds_the_lora_delta_exactly_and_restores_w0(full_and_fp8):
    _, fp8 = full_and_fp8
    unet = fp8.pipe.unet
    paths = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv1"]
    g = torch.Generator().manual_seed(0)
    mods = {}
    for p in paths:
        w = unet.get_submodule(p).weight
        down = torch.randn(4, *w.shape[1:], generator=g) * 0.1
        mods[p] = LoraModule(down=down, up=torch.randn(w.shape[0], 4, *([1] * (w.dim() - 2)), generator=g) * 0.1,
                             alpha=2.0)
    adapter = Adapter(name="a", modules={"unet": mods}, family=fp8.family.key)
    state0 = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, c = unet_inputs(unet, n=2)
    with torch.no_grad():
        out0 = unet(x, t, c).sample
    blender = Blender(fp8)
    blender.load(adapter, weight=0.7)
    for p, m in mods.items():
        layer = unet.get_submodule(p)
        expected = layer.base_weight + 0.7 * (2.0 / 4) * (m.up.flatten(1) @ m.down.flatten(1)).view(layer.weight.shape)
        torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(blender.delta("unet", p), expected - layer.base_weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert rel(unet(x, t, c).sample, out0) > 1e-3
    blender.reset()
    after = unet.state_dict()
    assert all(torch.equal(after[k].float(), v.float()) for k, v in state0.items())
    assert all(unet.get_submodule(p).delta is None for p in paths)
    with torch.no_grad():
        assert torch.equal(unet(x, t, c).sample, out0)


def test_images_from_a_quantized_base_say_so_in_their_infotext(full_and_fp8):
    from stylelora.generate import Settings, generate, parse_infotext

    settings = Settings(prompt="a red circle", seed=3, steps=2, guidance=3.0)
    full, fp8 = full_and_fp8
    assert parse_infotext(generate(fp8, settings)[0].info["parameters"])["Quantized base"] == "fp8"
    assert "Quantized base" not in parse_infotext(generate(full, settings)[0].info["parameters"])


# ------------------------------------------------------------------------------------------------ wrong combinations
def test_unknown_quantize_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="quantize_base must be fp8, int8, nf4 or int8-torchao"):
        quick_config(".", "/tmp/x.safetensors", quantize_base="int4")
    with pytest.raises(quantize.QuantizationError, match="expected one of fp8, int8, nf4, int8-torchao"):
        load_base("tiny-random", quantize="fp4")


def test_lycoris_module_on_a_quantized_layer_is_refused_before_anything_changes(full_and_fp8):
    from stylelora.adapter import LycoModule
    from stylelora.errors import AdapterError

    _, fp8 = full_and_fp8
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    layer = fp8.pipe.unet.get_submodule(path)
    diff = LycoModule(kind="full", tensors={"diff": torch.full(tuple(layer.weight.shape), 0.01)}, alpha=None,
                      shape=tuple(layer.weight.shape))
    blender = Blender(fp8)
    with pytest.raises(AdapterError, match=r"unet\.down_blocks.*cannot be blended into a quantized base layer"):
        blender.load(Adapter(name="d", modules={"unet": {path: diff}}, family=fp8.family.key), weight=1.0)
    assert blender.names == [] and layer.delta is None


def test_given_base_stored_otherwise_is_refused_and_a_quantized_one_is_recorded(style_dir, tmp_path):
    cfg = quick_config(style_dir, tmp_path / "a.safetensors", quantize_base="fp8")
    with pytest.raises(ConfigError, match="given base is stored in full precision"):
        train(cfg, base=load_base("tiny-random"))
    out = train(quick_config(style_dir, tmp_path / "b.safetensors", steps=1),
                base=load_base("tiny-random", quantize="fp8"))  # the web UI's case: the lent base decides
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["stylelora.quantize_base"] == "fp8"


def test_bake_from_a_quantized_base_is_refused_before_anything_is_written(tmp_path):
    """A baked model is the base's own tensors with the blend fused in; an fp8 base has none to give (its state dict
    holds weight_fp8/weight_scale, and a blend is kept apart as factors), so bake refuses through every entry."""
    from stylelora.bake import bake, save_folder, save_single_file
    from stylelora.errors import ModelError
    from stylelora.formats import save_adapter
    from stylelora.prompt import LoraRef

    fp8 = load_base("tiny-random", quantize="fp8")
    keys = fp8.pipe.unet.state_dict().keys()
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert f"{path}.weight_fp8" in keys and f"{path}.weight" not in keys  # what save_pretrained would have written
    w = fp8.pipe.unet.get_submodule(path).weight
    g = torch.Generator().manual_seed(0)
    adapter = Adapter(name="a", family=fp8.family.key, modules={"unet": {path: LoraModule(
        down=torch.randn(2, w.shape[1], generator=g), up=torch.randn(w.shape[0], 2, generator=g), alpha=2.0)}})
    file = save_adapter(adapter, tmp_path / "a.safetensors", pipe=fp8.pipe)
    fix = r"--quantize-base fp8.*load the base without --quantize-base"
    with pytest.raises(ModelError, match=fix):
        bake(fp8, [LoraRef(str(file))], tmp_path / "folder")
    with pytest.raises(ModelError, match=fix):
        bake(fp8, [LoraRef(str(file))], tmp_path / "one.safetensors", single_file=True)
    assert quantize.quantization(fp8.pipe) == "fp8" and fp8.pipe.unet.get_submodule(path).delta is None  # untouched
    blender = Blender(fp8)
    blender.load(file, weight=1.0)
    with pytest.raises(ModelError, match=fix):
        save_folder(blender, tmp_path / "folder")
    with pytest.raises(ModelError, match=fix):
        save_single_file(blender, tmp_path / "one.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bitsandbytes_modes_without_cuda_name_what_is_missing(style_dir, tmp_path, mode):
    with pytest.raises(quantize.QuantizationError, match=r"needs a CUDA GPU.*--quantize-base fp8"):
        load_base("tiny-random", quantize=mode)
    with pytest.raises(quantize.QuantizationError, match="needs a CUDA GPU"):
        train(quick_config(style_dir, tmp_path / "a.safetensors", quantize_base=mode))
    assert not (tmp_path / "a.safetensors").exists()


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
def test_fp8_base_trains_in_bf16_on_cuda_with_fp32_lora(style_dir, tmp_path):
    cfg = quick_config(style_dir, tmp_path / "g.safetensors", steps=3, quantize_base="fp8", mixed_precision="bf16",
                       log_every=1).replace(lr=1e-2)
    seen = {"lora": set(), "fp8": set(), "loss": []}

    def on_step(info):
        for m in info.models.values():
            seen["lora"].update((p.dtype, p.device.type) for p in m.parameters() if p.requires_grad)
            seen["fp8"].update((layer.weight_fp8.dtype, layer.compute_dtype, layer.weight_fp8.device.type)
                               for layer in m.modules() if quantize.is_fp8(layer))
        seen["loss"].append(float(info.loss))

    out = train(cfg, on_step=on_step)
    assert seen["lora"] == {(torch.float32, "cuda")}
    assert seen["fp8"] == {(torch.float8_e4m3fn, torch.bfloat16, "cuda")}
    assert all(np.isfinite(seen["loss"]))
    assert any("lora_up" in k and v.abs().sum() > 0 for k, v in load_file(str(out)).items())


@pytest.mark.gpu
def test_fp8_unet_on_cuda_matches_cpu():
    cpu = load_base("tiny", quantize="fp8")
    x, t, c = unet_inputs(cpu.pipe.unet)
    with torch.no_grad():
        ref = cpu.pipe.unet(x, t, c).sample
        cpu.pipe.unet.to("cuda")
        out = cpu.pipe.unet(x.cuda(), t.cuda(), c.cuda()).sample.cpu()
    assert rel(out, ref) < 1e-3


# ------------------------------------------------------------------------------------------------ bitsandbytes (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bitsandbytes_base_trains_and_its_adapter_loads_on_a_full_base(style_dir, tmp_path, mode):
    pytest.importorskip("bitsandbytes")
    cfg = quick_config(style_dir, tmp_path / "q.safetensors", steps=3, quantize_base=mode,
                       mixed_precision="bf16").replace(lr=1e-2)
    out = train(cfg)
    tensors = load_file(str(out))
    assert tensors and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    assert any("lora_up" in k and v.abs().sum() > 0 for k, v in tensors.items())
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["stylelora.quantize_base"] == mode
    base = load_base("tiny-random")
    Blender(base).load(out, weight=1.0)  # a normal file on a full base


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_bitsandbytes_base_blends_through_the_forward_hook_and_restores(mode):
    pytest.importorskip("bitsandbytes")
    base = load_base("tiny-random", quantize=mode, dtype=torch.float16)
    unet = base.pipe.unet
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(path)
    assert quantize.is_bnb_layer(layer)
    x = torch.randn(2, 5, layer.in_features, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out0 = layer(x)
    g = torch.Generator().manual_seed(0)
    m = LoraModule(down=torch.randn(4, layer.in_features, generator=g), up=torch.randn(layer.out_features, 4,
                                                                                        generator=g), alpha=4.0)
    blender = Blender(base)
    blender.load(Adapter(name="a", modules={"unet": {path: m}}, family=base.family.key), weight=0.5)
    with torch.no_grad():
        out1 = layer(x)
    expected = out0.float() + 0.5 * (x.float() @ m.down.T.cuda() @ m.up.T.cuda())
    torch.testing.assert_close(out1.float(), expected, rtol=2e-2, atol=2e-2)
    blender.reset()
    with torch.no_grad():
        assert torch.equal(layer(x), out0)


# ------------------------------------------------------------------------------------------------ torchao (optional)
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (optional: pip install torchao)")
AO_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def stored_int8(weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, scale) of a torchao Int8Tensor: what is kept in memory."""
    return weight.qdata, weight.scale


@needs_torchao
def test_torchao_int8_base_layers_forward_and_input_gradient_equal_the_stored_int8_reference():
    """Every Linear of the UNet and text encoder is stored as int8 with one scale per output row, max|w| / 127.5
    (symmetric over int8's 255 steps); the forward and the input's gradient are those of the weight rebuilt from
    that storage; convolutions stay as loaded; parameter bytes count the storage exactly."""
    full, ao = load_base("tiny-random"), load_base("tiny-random", quantize=quantize.TORCHAO)
    assert ao.quantize == quantize.TORCHAO and quantize.quantization(ao.pipe) == quantize.TORCHAO
    for comp in ("unet", "text_encoder"):
        saved = 0
        for name, m in getattr(full.pipe, comp).named_modules():
            layer = getattr(ao.pipe, comp).get_submodule(name)
            if type(m) is not torch.nn.Linear:
                assert not quantize.is_torchao_layer(layer), name
                continue
            assert quantize.is_torchao_layer(layer), name
            w0 = m.weight.detach()
            q, scale = stored_int8(layer.weight)
            assert q.dtype == torch.int8 and scale.shape == (w0.shape[0], 1)
            torch.testing.assert_close(scale, w0.abs().amax(1, keepdim=True) / 127.5, rtol=1e-6, atol=0)
            # round to the nearest step; a row's largest positive weight (127.5 steps) is clamped to 127: half a step
            assert ((w0 - q.float() * scale).abs() <= scale * (0.5 + 1e-4)).all(), name
            out_f, in_f = w0.shape
            saved += out_f * in_f * 4 - (out_f * in_f + out_f * 4 + out_f)  # int8 values, fp32 scale, int8 zero point
        assert quantize.parameter_bytes(getattr(ao.pipe, comp)) == quantize.parameter_bytes(
            getattr(full.pipe, comp)) - saved
    layer = ao.pipe.unet.get_submodule(AO_LAYER)
    q, scale = stored_int8(layer.weight)
    ref_w = q.float() * scale
    x1 = torch.randn(2, 5, layer.in_features, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out, ref = layer(x1), F.linear(x2, ref_w, layer.bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-5)


@needs_torchao
def test_torchao_base_trains_only_lora_and_its_adapter_loads_on_a_full_base(style_dir, tmp_path, caplog):
    base = load_base("tiny-random", quantize=quantize.TORCHAO)
    before = {n: {k: v.detach().clone() for k, v in getattr(base.pipe, n).named_parameters()}
              for n in ("unet", "text_encoder")}
    cfg = quick_config(style_dir, tmp_path / "q.safetensors", steps=3, quantize_base=quantize.TORCHAO).replace(lr=1e-2)
    cfg.network.train_text_encoder = True
    seen = set()

    def on_step(info):
        for m in info.models.values():
            seen.update(type(p).__name__ for p in m.parameters() if p.requires_grad)

    out = train(cfg, base=base, on_step=on_step)
    assert seen == {"Parameter"}  # the LoRA factors (fp32), never a torchao tensor
    for n, params in before.items():
        after = dict(getattr(base.pipe, n).named_parameters())
        for k, v in params.items():
            a = after[k]
            same = (torch.equal(a.qdata, v.qdata) and torch.equal(a.scale, v.scale)) if hasattr(v, "qdata") \
                else torch.equal(a, v)
            assert same, f"{n}.{k} changed"
    tensors = load_file(str(out))
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert any("lora_up" in k and v.abs().sum() > 0 for k, v in tensors.items())
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["stylelora.quantize_base"] == quantize.TORCHAO
    with caplog.at_level(logging.WARNING, logger="stylelora.quantize"):
        ours, theirs = ours_and_diffusers(out, load_base("tiny-random"))
    assert any("int8-torchao-quantized base" in r.getMessage() for r in caplog.records)
    assert np.abs(theirs - ours).max() <= 2.5 / 255


@needs_torchao
def test_resume_equals_uninterrupted_on_torchao_base(style_dir, tmp_path):
    def config(name):
        cfg = quick_config(style_dir, tmp_path / name / "x.safetensors", steps=4,
                           quantize_base=quantize.TORCHAO).replace(lr=1e-3)
        cfg.data.cache_dir = str(tmp_path / "cache")
        return cfg

    straight, resumed = straight_and_resumed(config)
    ta, tb = load_file(str(straight)), load_file(str(resumed))
    assert ta.keys() == tb.keys() and len(ta) > 0
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@needs_torchao
def test_torchao_base_blends_through_the_forward_hook_and_restores_exactly():
    """An int8 weight is never rewritten: the blend adds x·(c·B·A)ᵀ after the layer; reset gives the same outputs."""
    base = load_base("tiny-random", quantize=quantize.TORCHAO)
    layer = base.pipe.unet.get_submodule(AO_LAYER)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        out0 = layer(x)
    q0, s0 = (t.clone() for t in stored_int8(layer.weight))
    g = torch.Generator().manual_seed(0)
    m = LoraModule(down=torch.randn(4, layer.in_features, generator=g) * 0.1,
                   up=torch.randn(layer.out_features, 4, generator=g) * 0.1, alpha=2.0)
    blender = Blender(base)
    blender.load(Adapter(name="a", modules={"unet": {AO_LAYER: m}}, family=base.family.key), weight=0.7)
    with torch.no_grad():
        out1 = layer(x)
    q, scale = stored_int8(layer.weight)
    expected = F.linear(x, q.float() * scale + 0.7 * (2.0 / 4) * (m.up @ m.down), layer.bias)
    torch.testing.assert_close(out1, expected, rtol=0, atol=1e-5)
    assert rel(out1, out0) > 1e-3
    blender.reset()
    with torch.no_grad():
        assert torch.equal(layer(x), out0)
    assert torch.equal(stored_int8(layer.weight)[0], q0) and torch.equal(stored_int8(layer.weight)[1], s0)


@needs_torchao
def test_torchao_base_follows_autocast_like_plain_layers():
    """Mixed-precision training places the base in bf16 and samples under autocast with fp32 activations coming in:
    torchao's int8 layer computes in its input's dtype, so without the cast to the autocast dtype (a pre-hook) its
    fp32 output met a bf16 GroupNorm ("mixed dtype"). Reference: the full base, same dtype, same autocast."""
    full, ao = load_base("tiny-random"), load_base("tiny-random", quantize=quantize.TORCHAO)
    layer = ao.pipe.unet.get_submodule(AO_LAYER)
    x = torch.randn(2, 5, layer.in_features)
    q, scale = stored_int8(layer.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = F.linear(x, q.float() * scale, layer.bias)  # autocast casts a plain linear's operands to bf16
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    outs = []
    for base in (full, ao):
        unet = base.pipe.unet.to(torch.bfloat16)
        xs, t, c = unet_inputs(unet, n=2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(unet(xs, t, c).sample.float())
    assert rel(outs[1], outs[0]) < 0.05


def test_torchao_mode_without_torchao_names_the_package(monkeypatch, style_dir, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(quantize.QuantizationError, match=r"needs the torchao package \(pip install torchao\)"):
        load_base("tiny-random", quantize=quantize.TORCHAO)
    with pytest.raises(quantize.QuantizationError, match="pip install torchao"):
        train(quick_config(style_dir, tmp_path / "a.safetensors", quantize_base=quantize.TORCHAO))
    assert not (tmp_path / "a.safetensors").exists()
