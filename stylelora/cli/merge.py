"""``stylelora merge A.safetensors:0.6[@BLOCKS] B.safetensors:0.4 [--rank K] -o blend.safetensors``."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge weighted adapters into one adapter file",
                       description="Merge adapters: exact by default (rank = sum of ranks, same result as blending "
                                   "them at these weights); --rank K re-factorizes each module by SVD and prints "
                                   "the energy kept.")
    p.add_argument("adapters", nargs="+", metavar="FILE[:W[:W_TE]][@BLOCKS]",
                   help="adapter and weight (default 1); FILE:W_UNET:W_TE sets UNet and text encoder apart; "
                        "@BLOCKS: per-block weights as A1111's LoRA Block Weight (a preset such as INS or OUTALL, or "
                        "17 / 12 (SDXL) / 20 / 26 comma-separated values), e.g. a.safetensors:0.7@INS")
    p.add_argument("-o", "--output", required=True, help="output .safetensors")
    p.add_argument("--rank", type=int, help="bounded rank K (lossy, SVD per module)")
    p.add_argument("--adapters", dest="folders", action="append", default=[], metavar="DIR",
                   help="folder to look adapter names up in")
    p.add_argument("--base", help="resolve module names and check shapes against this base model; needed only "
                                  "for files that do not say their model family (metadata, key prefixes or "
                                  "a released model's shapes)")
    p.add_argument("--format", default="kohya", choices=["kohya", "peft"], help="output key layout")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never one of the inputs)")
    p.add_argument("--rename", action="append", default=[], metavar="[FILE:]OLD=NEW",
                   help="learnt token embeddings are kept from every source, unscaled by the weights; two sources "
                        "with the same trigger word are an error unless one is renamed: FILE's embedding OLD "
                        "becomes NEW (without FILE: in every source holding OLD but the first). Repeatable")
    zip_group = p.add_argument_group("ZipLoRA (--method zip)", "per-column merger coefficients learnt on each "
                                      "source's own training images (arXiv 2311.13600); the output is still a "
                                      "plain kohya LoRA")
    zip_group.add_argument("--method", choices=["exact", "zip"], default="exact",
                           help="exact: concatenated factors (or SVD with --rank); zip: learnt ZipLoRA coefficients "
                                "(needs --base)")
    zip_group.add_argument("--data", action="append", default=[], metavar="FILE=FOLDER",
                           help="the training images of source FILE (default: the folder its stylelora metadata "
                                "records); repeatable")
    zip_group.add_argument("--zip-steps", type=int, default=100, help="optimisation steps (the paper: about 100)")
    zip_group.add_argument("--zip-lr", type=float, default=0.01, help="Adam learning rate of the coefficients")
    zip_group.add_argument("--zip-lambda", type=float, default=0.01,
                           help="weight of the penalty on the similarity of the sources' coefficient vectors")
    zip_group.add_argument("--zip-batch-size", type=int, default=1, help="images per source per step")
    zip_group.add_argument("--seed", type=int, default=0, help="seed of the images, noise and timesteps drawn")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..merge import merge_files
    from ..prompt import parse_spec

    if not args.output.lower().endswith(".safetensors"):
        raise ConfigError(f"-o must name a .safetensors file, got {args.output}")
    refs = [parse_spec(s) for s in args.adapters]
    zip_options = None
    if args.method == "zip":  # its mistakes answered before the base is loaded
        from ..zipmerge import ZipOptions, check_request, parse_data

        check_request(args.rank, args.rename, args.base)
        zip_options = ZipOptions(steps=args.zip_steps, lr=args.zip_lr, lam=args.zip_lambda,
                                 batch_size=args.zip_batch_size, seed=args.seed, data=parse_data(args.data),
                                 progress=_zip_progress)
        zip_options.check()
    elif args.data:
        raise ConfigError("--data gives a source's training images to --method zip; add --method zip or drop it")
    pipe = None
    if args.base:
        from ..models import load_base

        pipe = load_base(args.base).pipe
    path, result = merge_files(refs, args.output, rank=args.rank, folders=args.folders, format=args.format,
                               pipe=pipe, rename=args.rename, overwrite=args.overwrite, zip=zip_options)
    adapter = result.adapter
    ranks = sorted({r for rs in adapter.ranks().values() for r in rs})
    print(f"wrote {path} ({adapter.num_modules()} modules, rank {_span(ranks)})")
    if adapter.embeddings:
        from ..formats import sidecar_paths

        words = ", ".join(f"{w} ({e.num_tokens} tokens)" for w, e in sorted(adapter.embeddings.items()))
        sidecars = ", ".join(str(p) for p in sidecar_paths(path, adapter.embeddings).values())
        print(f"embeddings: {words}; standalone files: {sidecars}")
    if zip_options is not None:
        import json

        record = json.loads(_metadata(path).get("stylelora_zip", "{}"))
        if record.get("last"):
            first, last = record["first"], record["last"]
            print(f"zip: {record['steps']} steps; distillation loss per source "
                  f"{_losses(first['distill'])} -> {_losses(last['distill'])}; coefficient similarity "
                  f"{first['similarity']:.4g} -> {record['similarity']:.4g}; mean coefficient per source "
                  + ", ".join(f"{m:.3f}" for m in record["mean_m"]))
    if result.energy is not None:
        print("retained energy: " + ", ".join(f"{part} {100 * e:.2f}%" for part, e in result.energy.items()))
    return 0


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _losses(values) -> str:
    return "/".join(f"{v:.4g}" for v in values)


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _zip_progress(info: dict) -> None:
    step, steps = info["step"], info["steps"]
    if step == 1 or step == steps or step % 10 == 0:
        print(f"zip step {step}/{steps}: loss {info['loss']:.5g} (distillation {_losses(info['distill'])}, "
              f"similarity {info['similarity']:.4g})", flush=True)
