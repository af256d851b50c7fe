"""What other tools see: key tables of the real SD1.5 / SDXL architectures, and diffusers loading our files."""
import re

import numpy as np
import pytest
import torch

from stylelora.adapter import Adapter, LoraModule
from stylelora.formats import save_adapter
from stylelora.formats.arch import builtin_table, ldm_unet_path
from stylelora.models import load_base

ATTN = re.compile(r"attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
UNET_T = ("to_q", "to_k", "to_v", "to_out.0")
TE_T = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="session")
def tiny(tiny_base):
    """The session's tiny base (tests/conftest.py builds it once, in a temp STYLELORA_HOME); only read here."""
    return tiny_base


@pytest.fixture
def one_thread():
    """The tiny pipeline gains nothing from threads, and on a busy machine they spin-wait each other for seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def attention_paths(table) -> list[str]:
    return [p for p in table.components["unet"].shapes if ATTN.search(p)]


def round_trip(comp) -> dict[str, str]:
    """live path -> kohya name; each name must lead back to its own module."""
    names = {}
    for path, name in comp.kohya_out.items():
        flat = name.replace(".", "_")
        assert comp.flat[flat] == path and flat not in comp.ambiguous
        names[path] = flat
    return names


# ---------------------------------------------------------------------------------------------- key tables
def test_sd15_table_attention_modules_unique_both_ways():
    table = builtin_table("sd1")
    unet = table.components["unet"]
    attn = attention_paths(table)
    assert len(attn) == 128
    names = round_trip(unet)
    assert len({names[p] for p in attn}) == 128
    assert names["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert unet.shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (320, 320)
    assert unet.shapes["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"] == (1280, 768)
    assert "up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0" in unet.flat
    assert not unet.ambiguous
    te = table.components["text_encoder"]
    te_names = round_trip(te)
    q = [n for n in te_names.values() if n.endswith("self_attn_q_proj")]
    assert len(q) == 12 and "text_model_encoder_layers_0_self_attn_q_proj" in q
    # ldm spellings of SD1 modules are accepted on reading and land on the same module
    assert unet.flat["input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert unet.flat["output_blocks_11_1_transformer_blocks_0_attn2_to_v"] == \
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"


def test_sdxl_table_every_attention_module_has_one_ldm_key():
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from stylelora.formats.arch import SDXL_UNET

    table = builtin_table("sdxl")
    unet = table.components["unet"]
    attn = attention_paths(table)
    assert len(attn) == 560  # 70 transformer blocks x (attn1, attn2) x (q, k, v, out)
    names = round_trip(unet)
    ldm = {p: names[p] for p in attn}
    assert all(n.startswith(("input_blocks_", "middle_block_", "output_blocks_")) for n in ldm.values())
    assert len(set(ldm.values())) == 560
    assert ldm["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert ldm["up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0"] == \
        "output_blocks_5_1_transformer_blocks_1_attn1_to_out_0"
    assert ldm["mid_block.attentions.0.transformer_blocks.9.attn2.to_k"] == \
        "middle_block_1_transformer_blocks_9_attn2_to_k"
    assert unet.shapes["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (640, 640)
    # diffusers' own sgm -> diffusers block mapping agrees with ours for every attention module
    sd = {f"lora_unet_{n}.lora_down.weight": torch.zeros(1) for n in ldm.values()}

    class Cfg:
        layers_per_block = SDXL_UNET["layers_per_block"]

    # (it renumbers blocks; the block words themselves are renamed later by _convert_unet_lora_key)
    words = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks"}
    theirs = [re.sub("|".join(words), lambda m: words[m.group(0)], k)
              for k in _maybe_map_sgm_blocks_to_diffusers(sd, Cfg)]
    assert sorted(theirs) == sorted(f"lora_unet_{p.replace('.', '_')}.lora_down.weight" for p in attn)
    # diffusers-named SDXL keys are accepted too
    assert unet.flat["down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_out_0"] == \
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0"
    te1, te2 = round_trip(table.components["text_encoder"]), round_trip(table.components["text_encoder_2"])
    assert sum(n.endswith("self_attn_q_proj") for n in te1.values()) == 12
    assert sum(n.endswith("self_attn_q_proj") for n in te2.values()) == 32
    assert "text_model_encoder_layers_31_self_attn_out_proj" in te2.values()


def test_ldm_names_of_resnets_and_samplers():
    from stylelora.formats.arch import SD15_UNET, SDXL_UNET

    assert ldm_unet_path("down_blocks.0.resnets.1.conv2", SD15_UNET) == "input_blocks.2.0.out_layers.3"
    assert ldm_unet_path("down_blocks.0.downsamplers.0.conv", SD15_UNET) == "input_blocks.3.0.op"
    assert ldm_unet_path("mid_block.resnets.1.time_emb_proj", SD15_UNET) == "middle_block.2.emb_layers.1"
    assert ldm_unet_path("up_blocks.0.upsamplers.0.conv", SD15_UNET) == "output_blocks.2.1.conv"
    assert ldm_unet_path("up_blocks.1.upsamplers.0.conv", SD15_UNET) == "output_blocks.5.2.conv"
    assert ldm_unet_path("up_blocks.2.resnets.0.conv_shortcut", SDXL_UNET) == "output_blocks.6.0.skip_connection"
    assert ldm_unet_path("add_embedding.linear_1", SDXL_UNET) == "label_emb.0.0"
    assert ldm_unet_path("conv_in", SDXL_UNET) == "input_blocks.0.0"
    every = [p for p in builtin_table("sdxl").components["unet"].shapes]
    assert all(ldm_unet_path(p, SDXL_UNET) for p in every)  # every LoRA-able SDXL module can be written


def test_sd2_table_uses_linear_projections():
    unet = builtin_table("sd2").components["unet"]
    assert len(unet.shapes["down_blocks.0.attentions.0.proj_in"]) == 2
    assert unet.shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (320, 1024)
    assert len(attention_paths(builtin_table("sd2"))) == 128


# ---------------------------------------------------------------------------- diffusers loads our files
def make_adapter(pipe, *, ranks=(4, 2), alphas=(2.0, 6.0), std=0.3, seed=0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for comp, model, targets, r, a in (("unet", pipe.unet, UNET_T, ranks[0], alphas[0]),
                                       ("text_encoder", pipe.text_encoder, TE_T, ranks[1], alphas[1])):
        mods[comp] = {n: LoraModule(torch.randn(r, m.in_features, generator=g) * std,
                                    torch.randn(m.out_features, r, generator=g) * std, a)
                      for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in targets)}
    return Adapter(mods, family="sd1")


def generate(pipe) -> np.ndarray:
    return pipe("a lighthouse at dusk", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def fused_by_hand(adapter: Adapter, components=("unet", "text_encoder")):
    pipe = load_base("tiny-random").pipe
    with torch.no_grad():
        for comp in components:
            model = getattr(pipe, comp)
            for path, m in adapter.modules[comp].items():
                model.get_submodule(path).weight += m.delta()
    return pipe


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_diffusers_load_lora_weights_matches_our_math(tiny, tmp_path, fmt, one_thread):
    a = make_adapter(tiny.pipe)
    if fmt == "peft":  # per-module rank and alpha ride in lora_adapter_metadata's rank_pattern / alpha_pattern
        odd = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
        m = a.modules["unet"][odd]
        g = torch.Generator().manual_seed(4)
        a.modules["unet"][odd] = LoraModule(torch.randn(6, m.down.shape[1], generator=g) * 0.3,
                                            torch.randn(m.up.shape[0], 6, generator=g) * 0.3, 9.0)
    f = save_adapter(a, tmp_path / f"style.{fmt}.safetensors", format=fmt, pipe=tiny.pipe)
    base = generate(load_base("tiny-random").pipe)
    mine = generate(fused_by_hand(a))
    unet_only = generate(fused_by_hand(a, ("unet",)))
    theirs_pipe = load_base("tiny-random").pipe
    theirs_pipe.load_lora_weights(str(f))
    assert any("lora_A" in n for n, _ in theirs_pipe.text_encoder.named_modules())
    theirs = generate(theirs_pipe)
    assert np.abs(theirs - mine).max() <= 1 / 255
    assert np.abs(theirs - base).max() > 20 / 255  # diffusers really applied it ...
    assert np.abs(mine - unet_only).max() > 5 / 255  # ... text encoder included
