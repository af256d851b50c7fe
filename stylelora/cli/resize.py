"""``stylelora resize FILE -o OUT`` with one rule: --rank, --energy, --ratio, --cumulative, --budget or --max-error."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "resize", help="shrink an adapter: a new rank per module from its singular values",
        description="Resize a LoRA: per module the SVD of its ΔW (from the small factors), then keep a fixed rank, "
                    "an energy share, a singular-value ratio, a cumulative share, or one global threshold that "
                    "fits a file-size budget. The result at weight 1 is exactly the best approximation of that "
                    "rank (alpha = new rank). Prints ranks, energy kept and sizes per part; with --base also how "
                    "far the UNet output moves.")
    p.add_argument("file", help="adapter .safetensors file (kohya or PEFT layout)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors")
    rule = p.add_argument_group("rule (one of; --budget may go with --max-error)")
    rule.add_argument("--rank", type=int, help="fixed rank K per module (at most the module's own rank)")
    rule.add_argument("--energy", type=float, metavar="E",
                      help="keep the smallest k with Σσ²_kept ≥ E²·Σσ² (Frobenius share), E in (0, 1]")
    rule.add_argument("--ratio", type=float, metavar="R", help="keep every σ > σ_max / R (R >= 1)")
    rule.add_argument("--cumulative", type=float, metavar="C", help="keep the smallest k with Σσ_kept ≥ C·Σσ")
    rule.add_argument("--budget", metavar="SIZE",
                      help="bytes of LoRA factors for the whole adapter (e.g. 800K, 12M, 1.5G; powers of 1024): "
                           "one global threshold on σ², so ranks go where the energy is")
    rule.add_argument("--max-error", type=float, metavar="EPS",
                      help="with --base: the smallest global budget whose UNet output stays within EPS "
                           "(relative to the adapter's own effect)")
    p.add_argument("--max-rank", type=int, help="no module keeps more than this rank")
    p.add_argument("--base", help="base model: resolves module names and enables the functional check (relative "
                                  "change of the UNet output on fixed noisy latents and prompts)")
    p.add_argument("--format", choices=["kohya", "peft"], help="output key layout (default: the input's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never the input)")
    p.set_defaults(func=run)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _span(t) -> str:
    lo, mid, hi = t
    return f"{lo}/{mid:g}/{hi}"


def format_table(result, size_before: int, size_after: int) -> str:
    rows = [f"{'part':<13} {'modules':>7}  {'rank before':>14}  {'rank after':>14}  {'energy':>8}  "
            f"{'size before':>12}  {'size after':>12}"]
    for r in result.rows():
        rows.append(f"{r['part']:<13} {r['modules']:>7}  {_span(r['before']):>14}  {_span(r['after']):>14}  "
                    f"{100 * r['energy']:>7.2f}%  {_mib(r['bytes_before']):>12}  {_mib(r['bytes_after']):>12}")
    rows.append(f"(ranks as min/median/max; sizes are the LoRA factors; file {_mib(size_before)} -> "
                f"{_mib(size_after)})")
    if result.error is not None:
        rows.append(f"UNet output relative error vs the original: {result.error:.4g}")
    return "\n".join(rows)


def run(args) -> int:
    from pathlib import Path

    from ..resize import resize_file

    base = None
    if args.base:
        from ..models import load_base

        base = load_base(args.base)
    path, result = resize_file(args.file, args.output, format=args.format, pipe=base, overwrite=args.overwrite,
                               rank=args.rank, energy=args.energy, ratio=args.ratio, cumulative=args.cumulative,
                               budget=args.budget, max_rank=args.max_rank, max_error=args.max_error)
    print(f"wrote {path}")
    print(format_table(result, Path(args.file).stat().st_size, path.stat().st_size))
    return 0
