"""bake: the diffusers folder and the single original-layout file both reproduce the blend's images."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_blend import one_thread  # noqa: F401 - autouse fixture: one torch thread
from test_blend import quiet, render, three_adapters

from stylelora.bake import BAKE_INFO
from stylelora.blend import Blender
from stylelora.cli import main
from stylelora.errors import ModelError
from stylelora.ldm import pipeline_to_ldm
from stylelora.models import ensure_tiny, load_base

WEIGHTS = {"ink": (0.7, 0.7), "pastel": (0.4, -0.2)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from stylelora.formats import save_adapter

    base = load_base("tiny-random")
    folder = tmp_path_factory.mktemp("loras")
    return {a.name: save_adapter(a, folder / f"{a.name}.safetensors", pipe=base.pipe)
            for a in three_adapters(base.pipe)}


@pytest.fixture(scope="module")
def blend_image(files):
    """The images the blend gives through the Blender on a fresh tiny base."""
    base = load_base("tiny-random")
    quiet(base.pipe)
    blender = Blender(base)
    blender.set({blender.load(files[n]): w for n, w in WEIGHTS.items()})
    return render(base.pipe)


def test_bake_folder_and_single_file_reproduce_blend(files, blend_image, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "my-model"
    loras = ["--lora", f"{files['ink']}:0.7", "--lora", f"{files['pastel']}:0.4:-0.2"]
    assert main(["bake", "--base", "tiny-random", *loras, "-o", str(out)]) == 0
    baked = quiet(StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False))
    assert abs(render(baked) - blend_image).max() < 1e-5
    info = json.loads((out / BAKE_INFO).read_text())
    assert [(a["name"], a["weight"]) for a in info["adapters"]] == [
        ("ink", 0.7), ("pastel", {"unet": 0.4, "text_encoder": -0.2})]

    single = tmp_path / "my-model.safetensors"
    assert main(["bake", "--base", "tiny-random", *loras, "-o", str(single), "--single-file"]) == 0
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
        md = f.metadata()
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "first_stage_model.decoder.mid.block_1.conv1.weight" in keys
    assert md["modelspec.architecture"] == "stable-diffusion-v1"
    loaded = quiet(StableDiffusionPipeline.from_single_file(str(single), config=str(out), safety_checker=None,
                                                            requires_safety_checker=False))
    assert abs(render(loaded) - blend_image).max() < 1e-5
    assert capsys.readouterr().out.count("wrote") == 2

    # an existing output is kept unless --overwrite
    assert main(["bake", "--base", "tiny-random", *loras, "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["bake", "--base", "tiny-random", "--lora", f"{files['tonly']}:0.5", "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / BAKE_INFO).read_text())["adapters"][0]["name"] == "tonly"


def test_ldm_layout_shapes(tiny_base):
    sd = pipeline_to_ldm(tiny_base.pipe, tiny_base.family)
    unet = tiny_base.pipe.unet.state_dict()
    assert torch.equal(sd["model.diffusion_model.input_blocks.0.0.weight"], unet["conv_in.weight"])
    assert torch.equal(sd["model.diffusion_model.input_blocks.2.0.op.weight"],
                       unet["down_blocks.0.downsamplers.0.conv.weight"])
    assert torch.equal(sd["model.diffusion_model.output_blocks.1.2.conv.weight"],
                       unet["up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(sd["model.diffusion_model.middle_block.2.in_layers.2.weight"],
                       unet["mid_block.resnets.1.conv1.weight"])
    vae = tiny_base.pipe.vae.state_dict()
    if "decoder.mid_block.attentions.0.to_out.0.weight" in vae:  # SD's VAE has it; a tiny one may not
        assert sd["first_stage_model.decoder.mid.attn_1.proj_out.weight"].dim() == 4  # ldm stores 1x1 convs
    assert torch.equal(sd["first_stage_model.decoder.up.3.block.0.conv1.weight"],
                       vae["decoder.up_blocks.0.resnets.0.conv1.weight"])  # ldm counts decoder levels bottom-up
    with pytest.raises(ModelError, match="SD1.x and SD2.x"):
        pipeline_to_ldm(tiny_base.pipe, "sdxl")


def _tiny_sd2(folder):
    """A small SD2-style pipeline built here (GELU text encoder, linear transformer projections, v-prediction, a VAE
    with mid-block attention), independent of how the built-in tiny base evolves."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from stylelora.models import write_tiny_tokenizer

    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=512, eos_token_id=513, pad_token_id=513))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    write_tiny_tokenizer(folder / "tok")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
                                   tokenizer=CLIPTokenizer.from_pretrained(folder / "tok"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    assert "decoder.mid_block.attentions.0.to_q.weight" in vae.state_dict()
    return pipe, folder / "pipe"


def test_sd2_single_file_round_trip(tmp_path):
    from diffusers import StableDiffusionPipeline

    from stylelora.bake import save_single_file
    from stylelora.models import detect_family

    pipe, folder = _tiny_sd2(tmp_path)
    assert detect_family(pipe).key == "sd2-v"
    out = save_single_file(Blender(pipe), tmp_path / "sd2.safetensors")
    with safe_open(str(out), "pt") as f:
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in set(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), safety_checker=None,
                                                      requires_safety_checker=False)
    for comp in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, comp).state_dict(), getattr(loaded, comp).state_dict()
        assert a.keys() == b.keys(), comp
        assert all(torch.equal(a[k], b[k]) for k in a), comp


def test_single_file_config_from_tiny_folder(files, tmp_path):
    """The single file also loads with the plain tiny base folder as config (any folder of the same arch)."""
    from diffusers import StableDiffusionPipeline

    from stylelora.bake import bake
    from stylelora.prompt import parse_spec

    out = bake(load_base("tiny-random"), [parse_spec(f"{files['ink']}:0.5")], tmp_path / "x.safetensors", single_file=True,
               dtype=torch.float16)
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(ensure_tiny("tiny-random")), safety_checker=None,
                                                      requires_safety_checker=False, torch_dtype=torch.float32)
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert loaded.unet.conv_out.weight.dtype == torch.float32
