"""LyCORIS (LoHa, LoKr, LoCon-Tucker), full-difference and DoRA files: load, blend fused, reset, convert; and the
model family of diffusers-converted kohya files read from the tensors (issue #21, loading side).

Every expected ΔW below is written here from the documented math (docs/formats.md, "LyCORIS files"), with explicit
loops or other contractions than the library's, and compared with what the Blender fused into the live weights.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from stylelora.adapter import LoraModule, LycoModule
from stylelora.blend import Blender
from stylelora.errors import AdapterError
from stylelora.formats import describe, load_adapter

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32, no bias
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # Linear 128 -> 32, with bias
CONV = "down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3, with bias
NORM = "down_blocks.0.resnets.0.norm1"  # GroupNorm over 32 channels


def kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


@pytest.fixture
def base(tiny_base):
    """The session's tiny SD1 base; every test leaves its weights as it found them (blender.reset())."""
    return tiny_base


def rand(*shape, seed=0, std=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def write(tmp_path, tensors, name="lyco.safetensors", metadata=None):
    f = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, f, metadata=metadata)
    return f


def tiny_meta() -> dict:
    """Metadata naming the tiny-random base (as a file trained on it has), so it resolves without a pipe."""
    from stylelora.config import TrainConfig

    return {"stylelora.config": TrainConfig().replace(base="tiny-random").to_json(), "stylelora.family": "sd1"}


def fused(base, f, weight=1.0):
    """{(comp, path): ΔW} the Blender fused at ``weight``, then the base restored."""
    blender = Blender(base)
    name = blender.load(f, weight=weight)
    out = {key: blender.delta(*key).clone() for key in blender._index[name]}
    blender.reset()
    return out


def close(a, b, rel=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err <= rel, err


def layer(base, path):
    return base.pipe.unet.get_submodule(path)


# ------------------------------------------------------------------------------------------- references
def ref_matmul(a, b):
    """a @ b by explicit sums over the rank (independent of torch's matmul path)."""
    return sum(a[:, r:r + 1] * b[r:r + 1, :] for r in range(a.shape[1]))


def ref_kron(a, b):
    """Block matrix [a[i, j] · b] (b may be a conv kernel [o, i, kh, kw]: blocks over the channel axes)."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def ref_tucker(core, a, b):
    """W[p, q, k, l] = Σ_ij core[i, j, k, l] a[i, p] b[j, q], as two mode products with tensordot."""
    t = torch.tensordot(a.T, core, dims=([1], [0]))  # [p, j, k, l]
    return torch.tensordot(t, b, dims=([1], [0])).permute(0, 3, 1, 2)  # [p, k, l, q] -> [p, q, k, l]


# ------------------------------------------------------------------------------------------- per type
def test_loha_linear_and_tucker_conv(base, tmp_path):
    r = 4
    t = {f"{kohya(Q)}.hada_w1_a": rand(32, r, seed=1), f"{kohya(Q)}.hada_w1_b": rand(r, 32, seed=2),
         f"{kohya(Q)}.hada_w2_a": rand(32, r, seed=3), f"{kohya(Q)}.hada_w2_b": rand(r, 32, seed=4),
         f"{kohya(Q)}.alpha": torch.tensor(2.0)}
    c = kohya(CONV)  # Tucker: w_a [r, out], w_b [r, in], t [r, r, kh, kw]
    t.update({f"{c}.hada_w1_a": rand(r, 32, seed=5), f"{c}.hada_w1_b": rand(r, 32, seed=6),
              f"{c}.hada_t1": rand(r, r, 3, 3, seed=7), f"{c}.hada_w2_a": rand(r, 32, seed=8),
              f"{c}.hada_w2_b": rand(r, 32, seed=9), f"{c}.hada_t2": rand(r, r, 3, 3, seed=10),
              f"{c}.alpha": torch.tensor(1.0)})
    d = fused(base, write(tmp_path, t), weight=0.7)
    want_q = 0.7 * (2.0 / r) * ref_matmul(t[f"{kohya(Q)}.hada_w1_a"], t[f"{kohya(Q)}.hada_w1_b"]) * \
        ref_matmul(t[f"{kohya(Q)}.hada_w2_a"], t[f"{kohya(Q)}.hada_w2_b"])
    close(d[("unet", Q)], want_q)
    want_c = 0.7 * (1.0 / r) * ref_tucker(t[f"{c}.hada_t1"], t[f"{c}.hada_w1_a"], t[f"{c}.hada_w1_b"]) * \
        ref_tucker(t[f"{c}.hada_t2"], t[f"{c}.hada_w2_a"], t[f"{c}.hada_w2_b"])
    close(d[("unet", CONV)], want_c)


def test_lokr_full_factors_ignore_alpha_and_decomposed_w2_uses_its_rank(base, tmp_path):
    q, c, ff = kohya(Q), kohya(CONV), kohya(FF)
    t = {f"{q}.lokr_w1": rand(4, 4, seed=1), f"{q}.lokr_w2": rand(8, 8, seed=2), f"{q}.alpha": torch.tensor(3.0),
         # FF: w1 from factors, w2 from factors of rank 2 (its rank is the one alpha divides)
         f"{ff}.lokr_w1_a": rand(4, 1, seed=3), f"{ff}.lokr_w1_b": rand(1, 8, seed=4),
         f"{ff}.lokr_w2_a": rand(8, 2, seed=5), f"{ff}.lokr_w2_b": rand(2, 16, seed=6),
         f"{ff}.alpha": torch.tensor(3.0),
         # conv: Tucker w2 [8, 8, 3, 3] from t2 [r, r, 3, 3], a [r, out2], b [r, in2]
         f"{c}.lokr_w1": rand(4, 4, seed=7), f"{c}.lokr_t2": rand(2, 2, 3, 3, seed=8),
         f"{c}.lokr_w2_a": rand(2, 8, seed=9), f"{c}.lokr_w2_b": rand(2, 8, seed=10), f"{c}.alpha": torch.tensor(1.0)}
    d = fused(base, write(tmp_path, t))
    close(d[("unet", Q)], ref_kron(t[f"{q}.lokr_w1"], t[f"{q}.lokr_w2"]))  # no factor ranks: scale 1
    w1 = ref_matmul(t[f"{ff}.lokr_w1_a"], t[f"{ff}.lokr_w1_b"])
    w2 = ref_matmul(t[f"{ff}.lokr_w2_a"], t[f"{ff}.lokr_w2_b"])
    close(d[("unet", FF)], (3.0 / 2) * ref_kron(w1, w2))
    w2c = ref_tucker(t[f"{c}.lokr_t2"], t[f"{c}.lokr_w2_a"], t[f"{c}.lokr_w2_b"])
    close(d[("unet", CONV)], (1.0 / 2) * ref_kron(t[f"{c}.lokr_w1"], w2c))


def test_lokr_flat_conv_factors(base, tmp_path):
    """LyCORIS' non-Tucker conv LoKr: w2_b is [r, in2·kh·kw]; ΔW is the Kronecker product reshaped to the layer."""
    c = kohya(CONV)
    t = {f"{c}.lokr_w1": rand(2, 2, seed=1), f"{c}.lokr_w2_a": rand(16, 3, seed=2),
         f"{c}.lokr_w2_b": rand(3, 16 * 9, seed=3), f"{c}.alpha": torch.tensor(6.0)}
    d = fused(base, write(tmp_path, t))
    w2 = ref_matmul(t[f"{c}.lokr_w2_a"], t[f"{c}.lokr_w2_b"]).reshape(16, 16, 3, 3)
    close(d[("unet", CONV)], 2.0 * ref_kron(t[f"{c}.lokr_w1"], w2))


def test_locon_tucker_mid(base, tmp_path):
    c, r = kohya(CONV), 3
    t = {f"{c}.lora_down.weight": rand(r, 32, 1, 1, seed=1), f"{c}.lora_mid.weight": rand(r, r, 3, 3, seed=2),
         f"{c}.lora_up.weight": rand(32, r, 1, 1, seed=3), f"{c}.alpha": torch.tensor(1.5)}
    d = fused(base, write(tmp_path, t), weight=-0.5)
    up, down = t[f"{c}.lora_up.weight"].flatten(1), t[f"{c}.lora_down.weight"].flatten(1)
    mid = t[f"{c}.lora_mid.weight"]
    want = torch.zeros(32, 32, 3, 3)
    for n in range(r):
        for m in range(r):
            want += up[:, n, None, None, None] * mid[n, m][None, None] * down[m][None, :, None, None]
    close(d[("unet", CONV)], -0.5 * (1.5 / r) * want)


def test_full_diff_with_bias_and_exact_reset(base, tmp_path):
    ff = layer(base, FF)
    w0, b0 = ff.weight.detach().clone(), ff.bias.detach().clone()
    t = {f"{kohya(FF)}.diff": rand(32, 128, seed=1), f"{kohya(FF)}.diff_b": rand(32, seed=2),
         f"{kohya(FF)}.alpha": torch.tensor(8.0)}  # a full diff has no rank: alpha does not scale it
    blender = Blender(base)
    blender.load(write(tmp_path, t), weight=0.25)
    close(ff.weight.detach() - w0, 0.25 * t[f"{kohya(FF)}.diff"])
    close(ff.bias.detach() - b0, 0.25 * t[f"{kohya(FF)}.diff_b"])
    blender.reset()
    assert torch.equal(ff.weight, w0) and torch.equal(ff.bias, b0)
    from stylelora.cli.inspect import format_text

    info = describe(tmp_path / "lyco.safetensors", hashes=False)
    assert info["components"]["unet"]["types"] == {"full": 1} and info["components"]["unet"]["rank"] is None
    assert "1 modules (1 full)" in format_text(info)


def test_norm_layer_differences_and_exact_reset(base, tmp_path):
    """LyCORIS norm modules: W += w·w_norm, b += w·b_norm (A1111 network_norm.py; no alpha)."""
    norm = layer(base, NORM)
    w0, b0 = norm.weight.detach().clone(), norm.bias.detach().clone()
    t = {f"{kohya(NORM)}.w_norm": rand(32, seed=1), f"{kohya(NORM)}.b_norm": rand(32, seed=2)}
    f = write(tmp_path, t, metadata=tiny_meta())
    blender = Blender(base)
    blender.load(f, weight=-0.75)
    close(norm.weight.detach() - w0, -0.75 * t[f"{kohya(NORM)}.w_norm"])
    close(norm.bias.detach() - b0, -0.75 * t[f"{kohya(NORM)}.b_norm"])
    blender.reset()
    assert torch.equal(norm.weight, w0) and torch.equal(norm.bias, b0)
    assert load_adapter(f).modules["unet"][NORM].kind == "norm"  # resolves without a base too
    assert describe(f, hashes=False)["components"]["unet"]["types"] == {"norm": 1}


def ref_dora(w0, delta, m, axis):
    """m · (W0 + ΔW) / ‖W0 + ΔW‖, one norm per output row ("out") or per input column ("in"), by explicit loops."""
    merged = w0 + delta
    out = torch.empty_like(merged)
    if axis == "out":
        for o in range(merged.shape[0]):
            out[o] = merged[o] * (m.flatten()[o] / merged[o].norm())
    else:
        for i in range(merged.shape[1]):
            out[:, i] = merged[:, i] * (m.flatten()[i] / merged[:, i].norm())
    return out - w0


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_both_layouts_and_exact_reset(base, tmp_path, axis):
    q = kohya(Q)
    w0 = layer(base, Q).weight.detach().clone()
    down, up = rand(4, 32, seed=1), rand(32, 4, seed=2)
    lora = (2.0 / 4) * ref_matmul(up, down)
    # a trained magnitude: the norms of W0 + ΔW, perturbed
    norms = (w0 + lora).norm(dim=1 if axis == "out" else 0)
    m = norms * (1 + rand(32, seed=3, std=0.1))
    scale = m.reshape(32, 1) if axis == "out" else m.reshape(1, 32)
    f = write(tmp_path, {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up, f"{q}.alpha": torch.tensor(2.0),
                         f"{q}.dora_scale": scale})
    mod = load_adapter(f, pipe=base.pipe).modules["unet"][Q]
    assert isinstance(mod, LycoModule) and mod.dora_axis == axis
    blender = Blender(base)
    blender.load(f, weight=0.6)
    close(blender.delta("unet", Q), 0.6 * ref_dora(w0, lora, m, axis))
    blender.reset()
    assert torch.equal(layer(base, Q).weight, w0)


def test_peft_magnitude_vector_is_output_axis(base, tmp_path):
    w0 = layer(base, Q).weight.detach().clone()
    down, up = rand(2, 32, seed=1), rand(32, 2, seed=2)
    m = (w0 + ref_matmul(up, down)).norm(dim=1) * 1.1
    f = write(tmp_path, {f"unet.{Q}.lora_A.weight": down, f"unet.{Q}.lora_B.weight": up,
                         f"unet.{Q}.lora_magnitude_vector": m})
    close(fused(base, f)[("unet", Q)], ref_dora(w0, ref_matmul(up, down), m, "out"))


# ------------------------------------------------------------------------------------------- blends
def test_loha_plus_lora_is_the_sum(base, tmp_path):
    r = 2
    loha = {f"{kohya(Q)}.hada_w1_a": rand(32, r, seed=1), f"{kohya(Q)}.hada_w1_b": rand(r, 32, seed=2),
            f"{kohya(Q)}.hada_w2_a": rand(32, r, seed=3), f"{kohya(Q)}.hada_w2_b": rand(r, 32, seed=4)}
    lora = {f"{kohya(Q)}.lora_down.weight": rand(3, 32, seed=5), f"{kohya(Q)}.lora_up.weight": rand(32, 3, seed=6),
            f"{kohya(Q)}.alpha": torch.tensor(1.0)}
    fa, fb = write(tmp_path, loha, "a.safetensors"), write(tmp_path, lora, "b.safetensors")
    da, db = fused(base, fa)[("unet", Q)], fused(base, fb)[("unet", Q)]
    blender = Blender(base)
    blender.load(fa)
    blender.load(fb)
    blender.set({"a": 0.8, "b": -1.3})
    close(blender.delta("unet", Q), 0.8 * da - 1.3 * db)
    blender.reset()


def test_dora_after_a_lora_applies_to_the_weight_the_lora_left(base, tmp_path):
    """A1111/ComfyUI order: each adapter on the running weight, so DoRA normalises W0 + ΔW_lora + ΔW_dora-lora."""
    q = kohya(Q)
    w0 = layer(base, Q).weight.detach().clone()
    lora = {f"{q}.lora_down.weight": rand(3, 32, seed=5), f"{q}.lora_up.weight": rand(32, 3, seed=6)}
    down, up = rand(2, 32, seed=1), rand(32, 2, seed=2)
    m = rand(1, 32, seed=3).abs() + 1
    dora = {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up, f"{q}.dora_scale": m}
    blender = Blender(base)
    blender.load(write(tmp_path, lora, "a.safetensors"))
    blender.load(write(tmp_path, dora, "b.safetensors"))
    blender.set({"a": 0.5, "b": 0.9})
    w1 = w0 + 0.5 * ref_matmul(lora[f"{q}.lora_up.weight"], lora[f"{q}.lora_down.weight"])
    want = w1 + 0.9 * ref_dora(w1, ref_matmul(up, down), m, "in") - w0
    close(blender.delta("unet", Q), want)
    blender.reset()
    assert torch.equal(layer(base, Q).weight, w0)


# ------------------------------------------------------------------------------------------- malformed files
def loha_q(**drop_or_replace):
    t = {f"{kohya(Q)}.hada_w1_a": rand(32, 2), f"{kohya(Q)}.hada_w1_b": rand(2, 32),
         f"{kohya(Q)}.hada_w2_a": rand(32, 2), f"{kohya(Q)}.hada_w2_b": rand(2, 32)}
    for role, value in drop_or_replace.items():
        key = f"{kohya(Q)}.{role}"
        if value is None:
            del t[key]
        else:
            t[key] = value
    return t


@pytest.mark.parametrize("tensors, named", [
    (loha_q(hada_w2_b=None), f"{kohya(Q)}.hada_w2_b"),
    (loha_q(hada_w1_b=torch.zeros(3, 32)), f"{kohya(Q)}.hada_w1_b"),
    (loha_q(hada_w2_a=torch.full((32, 2), float("nan"))), f"{kohya(Q)}.hada_w2_a"),
    (loha_q(hada_w1_a=torch.zeros(16, 2), hada_w2_a=torch.zeros(16, 2)), f"{kohya(Q)}.hada_w1_a"),
    ({f"{kohya(Q)}.lokr_w1": torch.zeros(4, 4)}, f"{kohya(Q)}.lokr_w1"),
    ({f"{kohya(Q)}.lora_down.weight": rand(2, 32), f"{kohya(Q)}.lora_up.weight": rand(32, 2),
      f"{kohya(Q)}.dora_scale": torch.ones(1, 16)}, f"{kohya(Q)}.dora_scale"),
    ({f"{kohya(Q)}.dora_scale": torch.ones(1, 32)}, f"{kohya(Q)}.dora_scale"),
])
def test_malformed_files_name_the_key(base, tmp_path, tensors, named):
    f = write(tmp_path, tensors, "bad.safetensors")
    with pytest.raises(AdapterError) as e:
        load_adapter(f, pipe=base.pipe)
    assert str(f) in str(e.value) and named in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------- family from tensors
def diffusers_kohya_file(spec: str, path):
    """A LoRA on ``spec``'s UNet and text encoder(s), written the way diffusers' training scripts write their kohya
    output: PEFT state dicts with component prefixes through ``convert_state_dict_to_kohya`` (lora_te1_/lora_te2_
    for the text encoders whatever the family, diffusers UNet names)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from stylelora.models import load_base

    pipe = load_base(spec).pipe
    torch.manual_seed(0)
    state = {}
    te = ["q_proj", "k_proj", "v_proj", "out_proj"]  # diffusers' reader recognises these files by out_proj keys
    for comp, targets in (("unet", ["to_q", "to_k", "to_v", "to_out.0"]), ("text_encoder", te),
                          ("text_encoder_2", te)):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights="gaussian"))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # gaussian init leaves B at zero: give it values so ΔW is not 0
                p.data = torch.randn_like(p) * 0.05
        # text-encoder paths as transformers < 5 spells them (text_model.encoder...), which released files carry
        # and diffusers' kohya reader expects; the installed transformers may drop the text_model level
        state.update({f"{comp}.{k if comp == 'unet' or k.startswith('text_model.') else 'text_model.' + k}": v
                      for k, v in get_peft_model_state_dict(model).items()})
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(state).items()}, path)
    return path


def test_sd1_file_with_lora_te1_keys_loads_on_sd1_like_diffusers(base, tmp_path):
    import numpy as np
    from conftest import ours_and_diffusers, render

    f = diffusers_kohya_file("tiny-random", tmp_path / "sd1.safetensors")
    assert sorted(load_adapter(f, pipe=base.pipe).modules) == ["text_encoder", "unet"]
    assert describe(f, hashes=False)["family"] is None  # tiny widths: nothing says SDXL, nothing says SD1
    ours, theirs = ours_and_diffusers(f, base)
    assert np.abs(ours - theirs).max() <= 2.5 / 255
    assert np.abs(ours - render(base.pipe)).max() > 10 / 255  # the adapter does change the picture


@pytest.mark.parametrize("spec, family", [("tiny-sd2-v", None), ("tiny-sdxl", "sdxl")])
def test_diffusers_kohya_files_of_other_families(tmp_path, spec, family):
    from stylelora.models import load_base

    f = diffusers_kohya_file(spec, tmp_path / f"{spec}.safetensors")
    assert describe(f, hashes=False)["family"] == family
    a = load_adapter(f, pipe=load_base(spec).pipe)
    assert a.modules["text_encoder"] and a.modules["unet"]
    if family == "sdxl":
        assert a.modules["text_encoder_2"]


def test_sdxl_file_refused_on_sd1_by_its_second_text_encoder(base, tmp_path):
    f = diffusers_kohya_file("tiny-sdxl", tmp_path / "xl.safetensors")
    with pytest.raises(AdapterError, match="lora_te2_"):
        load_adapter(f, pipe=base.pipe)


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_family_from_cross_attention_width_with_lora_te1_keys(tmp_path, width, family):
    """Released-size shapes, no metadata, lora_te1_ text-encoder keys: the UNet's attn2.to_k width decides."""
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    f = write(tmp_path, {f"{k}.lora_down.weight": rand(2, width), f"{k}.lora_up.weight": rand(640, 2),
                         f"{te}.lora_down.weight": rand(2, 768), f"{te}.lora_up.weight": rand(768, 2)})
    assert describe(f, hashes=False)["family"] == family


# ------------------------------------------------------------------------------- convert, merge, inspect, bake
def mixed_file(tmp_path, base):
    """UNet: a LoHa on to_q, a Tucker LoCon on conv1, a DoRA (input axis) LoRA on ff.net.2; text encoder: LoKr."""
    r = 2
    q, c, ff = kohya(Q), kohya(CONV), kohya(FF)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    t = {f"{q}.hada_w1_a": rand(32, r, seed=1), f"{q}.hada_w1_b": rand(r, 32, seed=2),
         f"{q}.hada_w2_a": rand(32, r, seed=3), f"{q}.hada_w2_b": rand(r, 32, seed=4), f"{q}.alpha": torch.tensor(1.0),
         f"{c}.lora_down.weight": rand(r, 32, 1, 1, seed=5), f"{c}.lora_mid.weight": rand(r, r, 3, 3, seed=6),
         f"{c}.lora_up.weight": rand(32, r, 1, 1, seed=7),
         f"{ff}.lora_down.weight": rand(r, 128, seed=8), f"{ff}.lora_up.weight": rand(32, r, seed=9),
         f"{ff}.dora_scale": layer(base, FF).weight.detach().norm(dim=0, keepdim=True) * 1.2,
         f"{te}.lokr_w1": rand(4, 4, seed=10), f"{te}.lokr_w2_a": rand(8, r, seed=11),
         f"{te}.lokr_w2_b": rand(r, 8, seed=12), f"{te}.alpha": torch.tensor(3.0)}
    return write(tmp_path, t, "mixed.safetensors", metadata=tiny_meta())


def test_convert_to_lora_is_exact_at_full_rank_and_reports_the_error(base, tmp_path, capsys):
    from stylelora.cli import main

    f = mixed_file(tmp_path, base)
    want = fused(base, f)
    assert main(["convert", str(f), "--to", "lora", "-o", str(tmp_path / "no-base.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "DoRA" in err and "--base" in err, err
    out = tmp_path / "plain.safetensors"
    assert main(["convert", str(f), "--to", "lora", "-o", str(out), "--base", "tiny-random"]) == 0
    printed = capsys.readouterr().out
    assert "unet" in printed and "text_encoder" in printed and "relative error" in printed
    plain = load_adapter(out, pipe=base.pipe)
    assert all(isinstance(m, LoraModule) for mods in plain.modules.values() for m in mods.values())
    got = fused(base, out)
    assert set(got) == set(want)
    for key in want:
        close(got[key], want[key])
    # truncated: rank 1 per module; the printed error is the Frobenius share of ΔW it misses, per part
    low = tmp_path / "low.safetensors"
    assert main(["convert", str(f), "--to", "lora", "--rank", "1", "-o", str(low), "--base", "tiny-random"]) == 0
    rows = {line.split()[0]: float(line.split()[-1]) for line in capsys.readouterr().out.splitlines()
            if line.startswith(("unet ", "text_encoder "))}
    approx = fused(base, low)
    for part, comps in (("unet", ["unet"]), ("text_encoder", ["text_encoder"])):
        keys = [k for k in want if k[0] in comps]
        miss = sum(float((approx[k] - want[k]).square().sum()) for k in keys) ** 0.5
        total = sum(float(want[k].square().sum()) for k in keys) ** 0.5
        assert rows[part] == pytest.approx(miss / total, rel=1e-2, abs=1e-4)
        assert 0 < rows[part] < 1


def test_convert_without_base_names_the_dora_module(base, tmp_path):
    from stylelora.errors import ConfigError
    from stylelora.resize import to_lora

    with pytest.raises(ConfigError, match="DoRA.*unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"):
        to_lora(load_adapter(mixed_file(tmp_path, base), pipe=base.pipe))


def test_merge_of_a_loha_and_a_lora_is_exact(base, tmp_path):
    from stylelora.merge import merge

    loha = {f"{kohya(Q)}.hada_w1_a": rand(32, 2, seed=1), f"{kohya(Q)}.hada_w1_b": rand(2, 32, seed=2),
            f"{kohya(Q)}.hada_w2_a": rand(32, 2, seed=3), f"{kohya(Q)}.hada_w2_b": rand(2, 32, seed=4)}
    lora = {f"{kohya(Q)}.lora_down.weight": rand(3, 32, seed=5), f"{kohya(Q)}.lora_up.weight": rand(32, 3, seed=6)}
    fa, fb = write(tmp_path, loha, "a.safetensors"), write(tmp_path, lora, "b.safetensors")
    da, db = fused(base, fa)[("unet", Q)], fused(base, fb)[("unet", Q)]
    merged = merge([(load_adapter(fa, pipe=base.pipe), 0.5), (load_adapter(fb, pipe=base.pipe), 2.0)]).adapter
    close(merged.modules["unet"][Q].delta(), 0.5 * da + 2.0 * db)


def test_inspect_counts_module_types(base, tmp_path):
    info = describe(mixed_file(tmp_path, base), hashes=False)
    assert info["supported"] is True and info["unsupported_keys"] == []
    assert info["components"]["unet"]["types"] == {"loha": 1, "tucker": 1, "dora-lora": 1}
    assert info["components"]["text_encoder"]["types"] == {"lokr": 1}
    assert info["components"]["text_encoder"]["rank"] == 2  # LoKr: lokr_w2_b's rank, the one alpha divides


def test_bake_a_loha_into_a_folder(base, tmp_path):
    from diffusers import UNet2DConditionModel

    from stylelora.bake import bake
    from stylelora.prompt import LoraRef

    r = 2
    t = {f"{kohya(Q)}.hada_w1_a": rand(32, r, seed=1), f"{kohya(Q)}.hada_w1_b": rand(r, 32, seed=2),
         f"{kohya(Q)}.hada_w2_a": rand(32, r, seed=3), f"{kohya(Q)}.hada_w2_b": rand(r, 32, seed=4)}
    f = write(tmp_path, t)
    want = layer(base, Q).weight.detach() + 0.5 * fused(base, f)[("unet", Q)]
    from stylelora.models import load_base

    out = bake(load_base("tiny-random"), [LoraRef(str(f), 0.5, 0.5)], tmp_path / "baked")
    got = UNet2DConditionModel.from_pretrained(out / "unet").get_submodule(Q).weight.detach()
    close(got - layer(base, Q).weight.detach(), want - layer(base, Q).weight.detach())


def test_peft_dora_file_renders_as_diffusers_loads_it(base, tmp_path):
    """A DoRA adapter made by PEFT (use_dora: output-axis magnitude), saved by diffusers' save_lora_weights: our
    fused blend renders what diffusers' own load_lora_weights (PEFT's DoRA layers) renders."""
    import numpy as np
    from conftest import ours_and_diffusers, render
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from stylelora.models import load_base

    pipe = load_base("tiny-random").pipe
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "to_out.0"], use_dora=True,
                                     init_lora_weights=False))
    for name, p in pipe.unet.named_parameters():
        if "lora_magnitude_vector" in name:  # a trained magnitude, not the initial ‖W0‖
            p.data *= 1 + 0.3 * torch.rand_like(p)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "dora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    a = load_adapter(tmp_path / "dora", pipe=base.pipe)
    assert {m.dora_axis for m in a.modules["unet"].values()} == {"out"}
    f = tmp_path / "dora" / "pytorch_lora_weights.safetensors"
    ours, theirs = ours_and_diffusers(f, base)
    assert np.abs(ours - theirs).max() <= 2.5 / 255
    # the check can tell: the same factors read as a plain LoRA (magnitudes dropped) render otherwise
    import json

    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        md = h.metadata()
        plain = {k: h.get_tensor(k) for k in h.keys() if "lora_magnitude_vector" not in k}
    cfg = json.loads(md["lora_adapter_metadata"])
    md["lora_adapter_metadata"] = json.dumps({k: (False if k.endswith("use_dora") else v) for k, v in cfg.items()})
    blender = Blender(base)
    blender.load(write(tmp_path, plain, "plain.safetensors", metadata=md), weight=1.0)
    as_lora = render(base.pipe)
    blender.reset()
    assert np.abs(as_lora - theirs).max() > 10 / 255


def test_convert_to_kohya_keeps_the_lycoris_tensors_and_peft_refuses(base, tmp_path, capsys):
    from safetensors.torch import load_file

    from stylelora.cli import main

    f = mixed_file(tmp_path, base)
    out = tmp_path / "again.safetensors"
    assert main(["convert", str(f), "--to", "kohya", "-o", str(out)]) == 0
    src, got = load_file(f), load_file(out)
    assert set(src) == set(got) and all(torch.equal(src[k], got[k]) for k in src)
    assert load_adapter(out, pipe=base.pipe).content_hash() == load_adapter(f, pipe=base.pipe).content_hash()
    assert main(["convert", str(f), "--to", "peft", "-o", str(tmp_path / "p.safetensors")]) == 2
    assert "--to lora" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the real LyCORIS package
@pytest.mark.parametrize("cls, path, kw", [
    ("LohaModule", FF, {}),
    ("LohaModule", CONV, {"use_tucker": True}),
    ("LokrModule", FF, {"factor": 4}),
    ("LokrModule", CONV, {"factor": 4, "use_tucker": True}),
    ("LoConModule", CONV, {"use_tucker": True}),
    ("LoConModule", FF, {"weight_decompose": True, "wd_on_out": True}),
    ("LoConModule", FF, {"weight_decompose": True, "wd_on_out": False}),
    ("LohaModule", Q, {"weight_decompose": True}),
    ("FullModule", FF, {}),
    ("NormModule", NORM, {}),
])
def test_files_written_by_lycoris_fuse_to_what_its_forward_computes(base, tmp_path, cls, path, kw):
    """Where the lycoris-lora package is importable (it is not a dependency): modules it builds on the tiny base's
    layers, with random weights, saved under kohya names. The layer with our fused weights gives the output of
    LyCORIS' own forward (its inference path; its get_merged_weight applies alpha/rank twice for LoHa/LoKr, which
    neither its forward nor A1111/ComfyUI do, so the forward is the reference)."""
    modules = pytest.importorskip("lycoris.modules")
    org = layer(base, path)
    m = getattr(modules, cls)("x", org, lora_dim=2, alpha=1.5, **kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, t in m.named_parameters():  # its state_dict() gives copies: set the parameters themselves
            if key == "dora_scale":
                t.mul_(1 + 0.2 * torch.rand(t.shape, generator=g))
            elif key != "scalar":
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        if cls == "FullModule":  # as apply_to() leaves it after training: the parameter holds W0 + diff
            m.weight.add_(org.weight)
            m.bias.add_(org.bias)
            m.is_diff = False
        state = m.state_dict()  # what LyCORIS saves for this module (FullModule: diff = weight − W0)
        x = torch.randn((2, org.in_features) if path not in (CONV, NORM) else (1, 32, 6, 6), generator=g)
        plain, theirs = org(x), m(x)
    f = write(tmp_path, {f"{kohya(path)}.{k}": v.detach().clone() for k, v in state.items()})
    blender = Blender(base)
    blender.load(f, weight=1.0)
    with torch.no_grad():
        ours = org(x)
    blender.reset()
    close(ours - plain, theirs - plain)


def test_sdxl_loha_file_with_ldm_names_resolves_without_a_base(tmp_path):
    """kohya/LyCORIS SDXL files spell UNet modules with ldm names; the family comes from the lora_te2_ keys and the
    LoHa's shapes are checked against the released SDXL architecture (meta device, no weights)."""
    k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # down_blocks.1 ... attn2.to_k: 2048 -> 640
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # 1280 -> 1280
    t = {f"{k}.hada_w1_a": rand(640, 2), f"{k}.hada_w1_b": rand(2, 2048), f"{k}.hada_w2_a": rand(640, 2),
         f"{k}.hada_w2_b": rand(2, 2048), f"{te2}.lokr_w1": rand(8, 8), f"{te2}.lokr_w2": rand(160, 160)}
    a = load_adapter(write(tmp_path, t))
    assert a.family == "sdxl"
    m = a.modules["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert m.kind == "loha" and m.shape == (640, 2048)
    assert a.modules["text_encoder_2"]["text_model.encoder.layers.0.self_attn.q_proj"].kind == "lokr"
    bad = dict(t, **{f"{k}.hada_w1_b": rand(2, 768), f"{k}.hada_w2_b": rand(2, 768)})  # an SD1 width
    with pytest.raises(AdapterError, match=f"{k}.hada_w1_a"):
        load_adapter(write(tmp_path, bad, "bad.safetensors"), allow_unused_keys=False)


def test_bias_differences_are_never_dropped_silently(base, tmp_path, capsys):
    from stylelora.cli import main
    from stylelora.errors import ConfigError
    from stylelora.merge import merge
    from stylelora.resize import resize

    t = {f"{kohya(FF)}.diff": rand(32, 128, seed=1), f"{kohya(FF)}.diff_b": rand(32, seed=2)}
    f = write(tmp_path, t, metadata=tiny_meta())
    a = load_adapter(f, pipe=base.pipe)
    for call in (lambda: merge([(a, 1.0)]), lambda: resize(a, rank=2)):
        with pytest.raises(ConfigError, match="diff_b"):
            call()
    assert main(["convert", str(f), "--to", "lora", "-o", str(tmp_path / "w.safetensors")]) == 0
    assert "bias difference(s) (diff_b)" in capsys.readouterr().out
    n = write(tmp_path, {f"{kohya(NORM)}.w_norm": rand(32)}, "norm.safetensors", metadata=tiny_meta())
    with pytest.raises(ConfigError, match="w_norm"):
        merge([(load_adapter(n), 1.0)])


@pytest.mark.parametrize("name, family", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "sdxl"),  # a second transformer block: SDXL
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", None),  # SD1, SD2 or SDXL
])
def test_family_from_unet_transformer_depth(tmp_path, name, family):
    f = write(tmp_path, {f"{name}.lora_down.weight": rand(2, 640), f"{name}.lora_up.weight": rand(640, 2)})
    assert describe(f, hashes=False)["family"] == family
