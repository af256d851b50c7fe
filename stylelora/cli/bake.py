"""``stylelora bake --base BASE --lora FILE:W[@BLOCKS] … -o ./my-model [--single-file]``."""

from __future__ import annotations

from . import add_threads_arg
from .generate import add_model_args, check_refs, load_model


def register(sub) -> None:
    p = sub.add_parser("bake", help="write a model with a blend of adapters fused in",
                       description="Fuse adapters at their weights into the base and save a diffusers folder, or "
                                   "with --single-file one .safetensors checkpoint in the original SD layout "
                                   "(SD1.x/SD2.x).")
    add_model_args(p, device="cpu")  # fusing is cheap; fp32 on CPU bakes exactly
    p.add_argument("-o", "--output", required=True, help="output folder (or .safetensors with --single-file)")
    p.add_argument("--single-file", action="store_true", help="write one original-layout .safetensors checkpoint")
    p.add_argument("--half", action="store_true", help="store the single-file checkpoint in fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_threads_arg(p)
    p.set_defaults(func=run, precheck=check_refs)


def run(args) -> int:
    import torch

    from ..bake import bake, check_output
    from ..errors import ConfigError
    from ..prompt import parse_spec

    refs = [parse_spec(s) for s in args.lora]
    if not refs:
        raise ConfigError("bake needs at least one --lora FILE[:W[:W_TE]][@BLOCKS]")
    check_output(args.output, single_file=args.single_file, overwrite=args.overwrite, base_spec=args.base)
    base = load_model(args)
    out = bake(base, refs, args.output, folders=args.adapters, single_file=args.single_file,
               dtype=torch.float16 if args.half else None, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
