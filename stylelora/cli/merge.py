"""``stylelora merge A.safetensors:0.6 B.safetensors:0.4 [--rank K] -o blend.safetensors``."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge weighted adapters into one adapter file",
                       description="Merge adapters: exact by default (rank = sum of ranks, same result as blending "
                                   "them at these weights); --rank K re-factorizes each module by SVD and prints "
                                   "the energy kept.")
    p.add_argument("adapters", nargs="+", metavar="FILE[:W[:W_TE]]",
                   help="adapter and weight (default 1); FILE:W_UNET:W_TE sets UNet and text encoder apart")
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
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..merge import merge_files
    from ..prompt import parse_spec

    if not args.output.lower().endswith(".safetensors"):
        raise ConfigError(f"-o must name a .safetensors file, got {args.output}")
    refs = [parse_spec(s) for s in args.adapters]
    pipe = None
    if args.base:
        from ..models import load_base

        pipe = load_base(args.base).pipe
    path, result = merge_files(refs, args.output, rank=args.rank, folders=args.folders, format=args.format,
                               pipe=pipe, rename=args.rename, overwrite=args.overwrite)
    adapter = result.adapter
    ranks = sorted({r for rs in adapter.ranks().values() for r in rs})
    print(f"wrote {path} ({adapter.num_modules()} modules, rank {_span(ranks)})")
    if adapter.embeddings:
        from ..formats import sidecar_paths

        words = ", ".join(f"{w} ({e.num_tokens} tokens)" for w, e in sorted(adapter.embeddings.items()))
        sidecars = ", ".join(str(p) for p in sidecar_paths(path, adapter.embeddings).values())
        print(f"embeddings: {words}; standalone files: {sidecars}")
    if result.energy is not None:
        print("retained energy: " + ", ".join(f"{part} {100 * e:.2f}%" for part, e in result.energy.items()))
    return 0


def _span(values: list[int]) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
