"""``stylelora blend-report A B [C…] [--base BASE [--classify]] [--suggest-blocks [W,…]] [--json]``: how much
adapters' updates overlap, and block weights that give each contested block to one of them."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("blend-report", help="measure how much adapters interfere when blended",
                       description="Per module, how much two adapters' weight updates overlap (cosine of the "
                                   "updates; input/output overlap of the spaces they read and write, 0..1), "
                                   "summarised by UNet block and text encoder, for every pair. With --base, a grid "
                                   "of pictures of the first two adapters at every pair of --weights (rows: the "
                                   "first, columns: the second); with --classify on the tiny base, the toy "
                                   "classifier's detection rates in every cell.")
    p.add_argument("adapters", nargs="+", metavar="FILE", help="two or more adapter files")
    p.add_argument("--base", help="render the weight-sweep grid on this base (two adapters); also resolves module "
                                  "names for files that do not say their model family")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables (the "
                                                       "per-module figures included)")
    p.add_argument("--grid", default="blend-report.png", metavar="PNG", help="where --base writes the sweep grid")
    p.add_argument("--weights", default="0,0.5,1", help="comma-separated weights of the sweep, for both adapters")
    p.add_argument("--prompt", help="the sweep's prompt after both trigger words (default: a house by a lake)")
    p.add_argument("--classify", action="store_true",
                   help="tiny base, toy-style adapters: score N held-out scenes per cell with the toy classifier")
    p.add_argument("--n", type=int, default=8, help="pictures per cell with --classify")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the sweep")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale of the sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the --grid file if it exists")
    p.add_argument("--suggest-blocks", nargs="?", const="", default=None, metavar="W1,W2,...",
                   help="also choose A1111 block-weight vectors for blending the adapters at these weights (one "
                        "per file, in order; default 0.5 each; put the option after the files): each block where "
                        "they overlap (--block-threshold) goes to the adapter with the most of its update there, "
                        "at the blend's summed weight, the others 0 there; printed as <lora:NAME:W:lbw=...> tags "
                        "and --lora FILE:W@... options (see docs/block-weights.md)")
    p.add_argument("--block-threshold", type=float, default=0.3, metavar="T",
                   help="with --suggest-blocks: the overlap (0..1) from which a block counts as contested")
    p.add_argument("--block-metric", choices=("input", "output", "cosine"), default="input",
                   help="with --suggest-blocks: the overlap that decides (cosine: its absolute value)")
    p.set_defaults(func=run, precheck=precheck)


def _weights(text: str) -> list[float]:
    from ..errors import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: expected comma-separated numbers, e.g. --weights 0,0.5,1") from None
    if not values:
        raise ConfigError("--weights is empty: give at least one weight, e.g. --weights 0,0.5,1")
    return values


def _block_weights(args) -> list[float]:
    """``--suggest-blocks`` -> one weight per adapter file (0.5 each when no value is given)."""
    import math

    from ..errors import ConfigError

    text = args.suggest_blocks
    if not text:
        return [0.5] * len(args.adapters)
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--suggest-blocks {text!r}: expected comma-separated weights, one per adapter file, "
                          "e.g. --suggest-blocks 0.6,0.4 (put the option after the files)") from None
    if len(values) != len(args.adapters):
        raise ConfigError(f"--suggest-blocks {text!r}: {len(values)} weights for {len(args.adapters)} adapter files; "
                          "give one per file, in order")
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise ConfigError(f"--suggest-blocks {text!r}: weight {bad[0]:g} must be a number above 0")
    return values


def precheck(args) -> None:
    """Argument mistakes answered before torch is imported."""
    from pathlib import Path

    from ..errors import ConfigError

    if len(args.adapters) < 2:
        raise ConfigError("blend-report needs at least two adapter files")
    for f in args.adapters:
        if not Path(f).is_file():
            raise ConfigError(f"adapter file {f} does not exist")
    _weights(args.weights)
    if args.classify and not args.base:
        raise ConfigError("--classify scores the weight sweep's pictures: it needs --base tiny")
    if args.base and len(args.adapters) != 2:
        raise ConfigError(f"the weight sweep (--base) takes two adapters, got {len(args.adapters)}: leave out "
                          "--base for the overlap report of more")
    if args.n < 1 or args.steps < 1:
        raise ConfigError("--n and --steps must be 1 or more")
    if args.base and not args.grid.lower().endswith(".png"):
        raise ConfigError(f"--grid must name a .png file, got {args.grid}")
    if args.suggest_blocks is not None:
        _block_weights(args)
        if not 0.0 <= args.block_threshold <= 1.0:
            raise ConfigError(f"--block-threshold {args.block_threshold:g}: give an overlap from 0 to 1")


def run(args) -> int:
    from ..blend import read_adapter
    from ..interference import format_cells, format_table, report, sweep

    base = None
    if args.base:
        from ..atomic import check_output
        from ..models import load_base

        check_output(args.grid, args.adapters, overwrite=args.overwrite)
        base = load_base(args.base)
    adapters = [(f, read_adapter(f, pipe=base.pipe if base else None)) for f in args.adapters]
    result = report(adapters)
    if args.suggest_blocks is not None:
        result["suggested_blocks"] = suggested(args, adapters, base)
    if base is not None:
        grid, cells = sweep(base, adapters, weights=_weights(args.weights), prompt=args.prompt,
                            classify=args.classify, n=args.n, steps=args.steps, cfg=args.cfg, seed=args.seed)
        from ..atomic import atomic_path

        with atomic_path(args.grid, suffix=".png") as tmp:
            grid.save(tmp)
        result["sweep"] = {"grid": str(args.grid), "rows": args.adapters[0], "columns": args.adapters[1],
                           "cells": cells}
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return 0
    print(format_table(result))
    if "suggested_blocks" in result:
        print("\n" + format_suggested(result["suggested_blocks"]))
    if base is not None:
        table = format_cells(result["sweep"]["cells"], args.adapters)
        if table:
            print("\n" + table)
        print(f"\nwrote {args.grid} (rows: {args.adapters[0]} weight, columns: {args.adapters[1]} weight)")
    return 0


def suggested(args, adapters, base) -> dict:
    """``--suggest-blocks``: the chosen vectors (``interference.block_plan``) as lbw strings, prompt tags and
    ``--lora`` options, with the figures behind each block."""
    from pathlib import Path

    from ..blocks import unet_config_for

    weights = dict(zip(args.adapters, _block_weights(args)))
    config = unet_config_for(adapters[0][1], base.pipe if base is not None else None)
    return suggestion(adapters, weights, config, threshold=args.block_threshold, metric=args.block_metric,
                      names={f: Path(f).stem for f in args.adapters}, lora_options=True)


def suggestion(adapters, weights: dict, unet_config, *, threshold: float, metric: str, names: dict,
               lora_options: bool = False) -> dict:
    """Block weights for blending ``adapters`` ([(label, Adapter)]) at ``weights`` ({label: w}), as
    ``format_suggested`` prints them: ``interference.block_plan``'s vectors as lbw strings and
    ``<lora:NAME:W:lbw=…>`` prompt tags (NAME: ``names[label]``, what the prompt's tags look up), with
    ``lora_options`` also ``--lora LABEL:W@lbw`` options (labels that are files), and the figures behind each
    block. Shared by ``blend-report --suggest-blocks`` and the web UI's Blend report tab."""
    from ..blocks import _num
    from ..interference import block_plan

    plan = block_plan(adapters, weights, unet_config, threshold=threshold, metric=metric)
    labels = [label for label, _ in adapters]
    lbw = {f: plan["blocks"][f].text() for f in labels}
    return {"weights": weights, "threshold": threshold, "metric": metric, "length": plan["length"], "lbw": lbw,
            "names": {f: names[f] for f in labels},
            "tags": [f"<lora:{names[f]}:{_num(weights[f])}:lbw={lbw[f]}>" for f in labels],
            "lora": [f"--lora {f}:{_num(weights[f])}@{lbw[f]}" for f in labels] if lora_options else [],
            "rows": plan["rows"]}


def format_suggested(s: dict) -> str:
    """The printed choice (``suggestion``): the tags, the --lora options if any and a line per contested block."""
    names = s["names"]
    lines = [f"block weights for this blend ({s['length']} values; a block is contested from {s['metric']} overlap "
             f"{s['threshold']:g}): prompt tags", *(f"  {t}" for t in s["tags"])]
    if s["lora"]:
        lines += ["or generate options", *(f"  {o}" for o in s["lora"])]
    contested = [r for r in s["rows"] if r["contested"]]
    for r in contested:
        shares = ", ".join(f"{names[f]} {100 * v:.1f} %" for f, v in r["shares"].items())
        lines.append(f"  {r['block']:<5} -> {names[r['owner']]} (overlap {r['overlap']:.2f}; share of each "
                     f"adapter's update: {shares})")
    if not contested:
        lines.append("  no block is contested: every multiplier is 1 (the plain blend)")
    return "\n".join(lines)
