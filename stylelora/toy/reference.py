"""Random-weight pipelines of the released architectures (SD1.5, SDXL), for speed and memory benchmarks.

Random weights time exactly like trained ones; building them needs no download. Configs come from
``formats.arch`` (the same ones the key tables use) plus the SD VAE's.
"""

from __future__ import annotations

import torch

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, scaling_factor=0.18215,
)


def reference_pipeline(arch: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A diffusers pipeline of ``arch`` ("sd15" or "sdxl") with random weights, built directly on ``device``."""
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..formats.arch import CLIP_L, OPENCLIP_BIGG, SD15_UNET, SDXL_UNET
    from ..models import write_tiny_tokenizer

    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"unknown reference architecture {arch!r}: sd15 or sdxl")
    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(SD15_UNET if arch == "sd15" else SDXL_UNET))
        vae = AutoencoderKL(**SD_VAE, **({"force_upcast": True} if arch == "sdxl" else {}))
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L, **clip))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **clip)) if arch == "sdxl" else None
    for m in (unet, te, te2):
        if m is not None:
            m.to(dtype)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    # Token ids only need the right length (77) for timing; the byte-level tokenizer stands in for CLIP's vocabulary.
    tok_dir = Path(tempfile.mkdtemp(prefix="stylelora-tok-"))
    write_tiny_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    if arch == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, add_watermarker=False)
