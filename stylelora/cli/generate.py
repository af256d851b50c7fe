"""``stylelora generate PROMPT [--base BASE] [--lora FILE[:W[:W_TE]]]… [--adapters DIR] -o out.png``."""

from __future__ import annotations

import argparse
import secrets

from . import add_threads_arg


def add_model_args(p: argparse.ArgumentParser, *, device: str = "auto", quantize: bool = False) -> None:
    """--base, --base-config, --device, --dtype, --lora, --adapters: shared by generate and bake; --quantize-base
    with ``quantize`` (generate, not bake: a baked checkpoint is written from the base's weights)."""
    # the same default as `stylelora train` (RunConfig.base), so an adapter trained without --base just works
    p.add_argument("--base", default="tiny", help="base model: 'tiny', a diffusers folder, a .safetensors checkpoint "
                                                  "or a hub id (default: tiny, as for train)")
    p.add_argument("--base-config", help="diffusers folder with the config of a single-file --base (offline use)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:W[:W_TE]][@BLOCKS]",
                   help="adapter and weight (default 1); FILE:W_UNET:W_TE sets UNet and text encoder apart; "
                        "negative weights allowed; FILE may be a name found in --adapters; @BLOCKS adds per-block "
                        "weights as A1111's LoRA Block Weight: a preset (NONE, ALL, INS, IND, INALL, MIDD, OUTD, "
                        "OUTS, OUTALL, ALL0.5) or 17 (SD1/SD2), 12 (SDXL), 20 or 26 comma-separated values, "
                        "e.g. ink.safetensors:0.8@OUTALL. Repeatable.")
    p.add_argument("--adapters", action="append", default=[], metavar="DIR",
                   help="folder to look adapter names up in (for <lora:name:w> prompt tags and --lora NAME:W)")
    p.add_argument("--device", default=device, help="cpu, cuda, cuda:1, mps … (default: "
                   + ("cuda when available)" if device == "auto" else f"{device})"))
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights dtype (default: fp16 on a GPU, fp32 on CPU)")
    if quantize:
        add_quantize_arg(p)


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize-base", choices=["fp8", "int8", "nf4", "int8-torchao"], default=None,
                   help="keep the base's UNet and text encoders quantized in memory: fp8 (float8 weights, "
                        "per-channel scales; CPU and GPU; --dtype is then the compute dtype) | int8 | nf4 "
                        "(bitsandbytes, CUDA only) | int8-torchao (torchao int8 weight-only Linear layers; pip "
                        "install torchao). Adapters still load and blend (default: full precision)")


def check_refs(args) -> None:
    """--lora and --adapters mistakes, answered before torch is imported: a weight that is not a number, a file
    that does not exist (when there is no --adapters folder to look the name up in), a missing --adapters folder."""
    from pathlib import Path

    from ..errors import AdapterError, ConfigError
    from ..prompt import parse_spec

    for folder in args.adapters:
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"--adapters {folder}: not a folder")
    for spec in args.lora:
        ref = parse_spec(spec)
        if not args.adapters and not Path(ref.source).expanduser().is_file():
            raise AdapterError(f"adapter {ref.source!r}: no such file (pass a path, or --adapters FOLDER to look "
                               "names up)")


def device_dtype(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.float16
    return device, dtype


def load_model(args):
    """Load --base onto --device in --dtype; returns a models.Base."""
    from ..models import load_base

    device, dtype = device_dtype(args)
    return place_base(load_base(args.base, dtype=dtype, base_config=args.base_config,
                                quantize=getattr(args, "quantize_base", None)), device)


def place_base(base, device):
    """The loaded base onto ``device`` (a bitsandbytes-quantized component stays where it was loaded: on the GPU)."""
    import torch

    from ..quantize import place

    if base.quantize not in ("nf4", "int8"):
        base.pipe.to(device)  # fp8 layers move their fp8 storage (quantize._Fp8Layer._apply)
        return base
    for module in base.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            place(module, device, None)
    return base


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images with a weighted blend of adapters",
                       description="Generate images; adapters come from --lora FILE:W and/or A1111 prompt tags "
                                   "<lora:name:w> / <lora:name:w_te:w_unet> / <lora:name:w:lbw=BLOCKS> (names "
                                   "looked up in --adapters). PNGs carry the parameters A1111-style.")
    p.add_argument("prompt")
    add_model_args(p, quantize=True)
    p.add_argument("-o", "--output", default="out.png", help="output .png (several images: out-0.png, out-1.png, …)")
    p.add_argument("-n", "--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=-1, help="-1 picks one at random (recorded in the PNG)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", "--guidance", dest="guidance", type=float, default=7.0, help="classifier-free guidance")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--sampler", help="dpm++2m, dpm++2m-karras, euler, euler-a, heun, ddim, pndm, unipc "
                                     "(default: the base's scheduler)")
    p.add_argument("--num-images", type=int, default=1)
    add_threads_arg(p)
    p.set_defaults(func=run, precheck=check_refs)


def run(args) -> int:
    from ..blend import Blender
    from ..generate import Settings, generate, output_paths, save_png
    from ..prompt import parse_spec

    refs = [parse_spec(s) for s in args.lora]
    seed = args.seed if args.seed >= 0 else secrets.randbelow(2**32)
    settings = Settings(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=seed, steps=args.steps,
                        guidance=args.guidance, width=args.width, height=args.height, sampler=args.sampler,
                        num_images=args.num_images)
    paths = output_paths(args.output, settings.num_images)  # check -o before the slow model load
    base = load_model(args)
    if not args.verbose:
        base.pipe.set_progress_bar_config(disable=True)
    blender = Blender(base)
    blender.set(blender.load_refs(refs, args.adapters))
    images = generate(base, settings, blender, folders=args.adapters)
    if blender.active():
        print("blend: " + ", ".join(f"{n} {u:g}" + (f"/{t:g}" if t != u else "")
                                    + (f"@{blender.blocks[n]}" if n in blender.blocks else "")
                                    for n, (u, t) in blender.active().items()))
    if blender.trigger_words():  # learnt tokens: the style comes with the word, so say which words there are
        print("trigger words: " + ", ".join(f"{w} ({n})" for w, n in blender.trigger_words().items()))
    for image, path in zip(images, paths):
        save_png(image, path)
        print(f"wrote {path}")
    return 0
