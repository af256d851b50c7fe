"""``stylelora convert FILE --to peft|kohya -o OUT``: rewrite an adapter in another layout, never over its input."""

from __future__ import annotations

from pathlib import Path

from ..atomic import check_output
from ..errors import AdapterError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an adapter between the kohya and PEFT/diffusers layouts",
        description="Read any supported LoRA file and write it in the kohya (A1111/ComfyUI/kohya) or PEFT "
                    "(diffusers) layout. Tensors are copied bit for bit; metadata is kept. Learnt token embeddings "
                    "are kept (bundle_emb.* in kohya files, stylelora_emb.* in PEFT files) and also written "
                    "as standalone embedding files beside OUT.",
    )
    p.add_argument("file", help="adapter file (or diffusers LoRA output folder) to read")
    p.add_argument("--to", required=True, choices=("kohya", "peft"),  # = formats.FORMATS, not imported here (torch)
                   help="layout to write")
    p.add_argument("-o", "--output", required=True, help="file to write (.safetensors)")
    p.add_argument("--base", help="base model to resolve module names and check shapes against; needed only "
                                  "for files that do not say their model family (metadata, key prefixes or "
                                  "a released model's shapes). Without it, shapes are checked against the "
                                  "released model when they fit it, else taken from the file")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists (never the input)")
    p.add_argument("--allow-unused-keys", action="store_true",
                   help="warn about keys that match no module instead of refusing the file")
    p.set_defaults(func=run)


def run(args) -> int:
    src, out = Path(args.file), Path(args.output)
    if out.suffix.lower() != ".safetensors":
        raise AdapterError(f"output {out} must be a .safetensors file")
    inputs = [src] + ([p for p in src.iterdir() if p.is_file()] if src.is_dir() else [])
    check_output(out, inputs, overwrite=args.force, flag="--force")  # never an input, even with --force
    from ..formats import load_adapter, save_adapter  # late: torch is imported only once a command runs

    pipe = None
    if args.base:
        from ..models import load_base

        pipe = load_base(args.base).pipe
    adapter = load_adapter(src, pipe=pipe, allow_unused_keys=args.allow_unused_keys)
    from ..formats import sidecar_paths

    for extra in sidecar_paths(out, adapter.embeddings).values():  # written beside OUT: never over an input
        check_output(extra, inputs, overwrite=True)
    save_adapter(adapter, out, format=args.to, pipe=pipe)
    print(f"wrote {out} ({args.to} layout, {adapter.num_modules()} modules, family {adapter.family or 'unknown'})")
    if adapter.embeddings:
        from ..formats import sidecar_paths

        words = ", ".join(f"{w} ({e.num_tokens} tokens)" for w, e in sorted(adapter.embeddings.items()))
        sidecars = ", ".join(str(p) for p in sidecar_paths(out, adapter.embeddings).values())
        print(f"embeddings: {words}; standalone files: {sidecars}")
    return 0
