"""Sample images during training: fixed seeds, the current LoRA state, written as PNGs with A1111's parameters."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .config import TrainConfig


def sample_prompts(cfg: TrainConfig) -> list[str]:
    """The prompts sample images are made from: --sample-prompts, else the trigger word alone."""
    return list(cfg.run.sample_prompts) or ([cfg.data.trigger] if cfg.data.trigger else [])


def thumbnail_index(cfg: TrainConfig) -> int:
    """Which sample becomes the adapter's thumbnail: the first whose prompt says more than the trigger word (a
    picture of the trigger alone is mostly noise on a small base), else the first."""
    trigger = (cfg.data.trigger or "").strip().lower()
    for i, prompt in enumerate(sample_prompts(cfg)):
        words = [w.strip().lower() for w in prompt.replace(",", " ").split()]
        if any(w and w != trigger for w in words):
            return i
    return 0


@torch.no_grad()
def write_samples(pipe, cfg: TrainConfig, output: Path, step: int, accelerator, return_paths: bool = False) -> list:
    """Sample images with fixed seeds at the current LoRA state, written as PNG; returns the images (or paths)."""
    prompts = sample_prompts(cfg)
    if not prompts:
        return []
    folder = output.parent / f"{output.stem}-samples"
    folder.mkdir(parents=True, exist_ok=True)
    unet_mode = pipe.unet.training
    pipe.unet.eval()
    vae_device = pipe.vae.device
    pipe.vae.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    images, paths = [], []
    te_modes = {n: getattr(pipe, n).training for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None)}
    for n in te_modes:
        getattr(pipe, n).eval()
    res = cfg.data.resolution
    from . import __version__
    from .generate import _num, infotext, sampler_label, save_png

    # the pipeline's own default guidance (7.5 for SD 1/2, 5 for SDXL) is used and so recorded
    guidance = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    sampler, schedule = sampler_label(pipe.scheduler)
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(cfg.run.sample_seed + i)
        with accelerator.autocast():
            img = pipe(prompt, num_inference_steps=cfg.run.sample_steps, height=res, width=res, generator=g,
                       output_type="pil").images[0]
        # A1111's `parameters` chunk: the sample's prompt and settings travel with the PNG (PNG Info, our UI)
        img.info["parameters"] = infotext(prompt, "", {
            "Steps": cfg.run.sample_steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": _num(guidance),
            "Seed": cfg.run.sample_seed + i, "Size": f"{res}x{res}", "Model": cfg.run.base,
            "Training step": step, "Version": f"stylelora {__version__}"})
        path = save_png(img, folder / f"step-{step:06d}-{i}.png")  # atomic: a full disk never leaves half a PNG
        images.append(img)
        paths.append(path)
    pipe.vae.to(vae_device)
    pipe.unet.train(unet_mode)
    for n, mode in te_modes.items():
        getattr(pipe, n).train(mode)
    return paths if return_paths else images
