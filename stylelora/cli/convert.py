"""``stylelora convert FILE --to peft|kohya -o OUT``: rewrite an adapter in another layout, never over its input."""

from __future__ import annotations

from pathlib import Path

from ..atomic import check_output
from ..errors import AdapterError, ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an adapter between the kohya and PEFT/diffusers layouts, or into a plain LoRA",
        description="Read any supported adapter file and write it in the kohya (A1111/ComfyUI/kohya) or PEFT "
                    "(diffusers) layout. Tensors are copied bit for bit; metadata is kept. Learnt token embeddings "
                    "are kept (bundle_emb.* in kohya files, stylelora_emb.* in PEFT files) and also written "
                    "as standalone embedding files beside OUT. --to lora turns any file (LoHa, LoKr, LoCon with "
                    "lora_mid, full difference, DoRA) into a plain kohya LoRA by the SVD of each module's weight "
                    "update, for tools that only read LoRA, and prints the approximation error per part.",
    )
    p.add_argument("file", help="adapter file (or diffusers LoRA output folder) to read")
    p.add_argument("--to", required=True, choices=("kohya", "peft", "lora"),  # formats.FORMATS + lora (no torch here)
                   help="layout to write; lora: a plain kohya LoRA by SVD (exact unless --rank/--energy)")
    p.add_argument("--rank", type=int, help="with --to lora: at most this rank per module")
    p.add_argument("--energy", type=float, metavar="E",
                   help="with --to lora: per module the fewest ranks that keep Σσ²_kept ≥ E²·Σσ² (E in (0, 1])")
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
    if args.to != "lora" and (args.rank is not None or args.energy is not None):
        raise ConfigError("--rank and --energy go with --to lora (an SVD); use stylelora resize to shrink a LoRA")
    if args.rank is not None and args.energy is not None:
        raise ConfigError("give --rank or --energy, not both")
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
    if args.to == "lora":
        from ..resize import to_lora

        result = to_lora(adapter, rank=args.rank, energy=args.energy, pipe=pipe)
        save_adapter(result.adapter, out, format="kohya", pipe=pipe)
        print(f"wrote {out} (plain LoRA, kohya layout, {adapter.num_modules()} modules, family "
              f"{adapter.family or 'unknown'})")
        print(lora_table(adapter, result))
        dropped = result.method.get("dropped_bias")
        if dropped:
            print(f"warning: {len(dropped)} bias difference(s) (diff_b) / norm-layer module(s) (w_norm, b_norm) "
                  f"left out, e.g. {dropped[0]}: a LoRA holds Linear/conv weight updates only (blend or bake the "
                  "original file to keep them)")
    else:
        save_adapter(adapter, out, format=args.to, pipe=pipe)
        print(f"wrote {out} ({args.to} layout, {adapter.num_modules()} modules, family {adapter.family or 'unknown'})")
    if adapter.embeddings:
        from ..formats import sidecar_paths

        words = ", ".join(f"{w} ({e.num_tokens} tokens)" for w, e in sorted(adapter.embeddings.items()))
        sidecars = ", ".join(str(p) for p in sidecar_paths(out, adapter.embeddings).values())
        print(f"embeddings: {words}; standalone files: {sidecars}")
    return 0


def lora_table(adapter, result) -> str:
    """Per part: modules by type, ranks written (min/median/max) and the relative error ‖ΔW − ΔW_lora‖/‖ΔW‖."""
    from collections import Counter

    from ..adapter import LycoModule
    from ..resize import PARTS

    rows = [f"{'part':<13} {'modules':<34} {'rank (min/median/max)':>22}  {'relative error':>14}"]
    for r in result.rows():
        kinds = Counter(("dora-" if getattr(m, "dora", False) else "") + (m.kind if isinstance(m, LycoModule)
                                                                          else "lora")
                        for c, mods in adapter.modules.items() if PARTS[c] == r["part"] for m in mods.values())
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        lo, mid, hi = r["after"]
        err = max(0.0, 1.0 - r["energy"]) ** 0.5
        rows.append(f"{r['part']:<13} {what:<34} {f'{lo}/{mid:g}/{hi}':>22}  {err:>14.3g}")
    rows.append("(relative error: Frobenius norm of what the LoRA misses of each part's ΔW at weight 1)")
    return "\n".join(rows)
