"""Style-quality benchmark, offline: does a LoRA adapter learn a style, keep the content, stay behind its trigger,
and blend with another style? On the pretrained ``tiny`` base and the procedural toy-world styles.

    python benchmarks/style_quality.py [--styles halftone,stripes,outline,pastel] [--n 20] [--out DIR]

For each style: train an adapter on examples/styles/<style> with the demo's recipe (stylelora.toyworld.train_config,
through ``stylelora.train``); then draw ``--n`` held-out prompts (shape/colour pairs no style picture shows) with
the same seeds: on the base, with the adapter and its trigger, and with the adapter but no trigger. The toy-world
classifier (stylelora.classifiers, trained on procedural pictures only) reads every picture. Metrics:

- fidelity   share of triggered pictures the classifier calls this style            goal >= 90 %
- content    share whose shape AND colour are the prompt's, next to the base's     goal within 10 points
- leakage    share of untriggered pictures (adapter loaded) called this style      goal <= 10 %
- base FP    share of base pictures called this style (the classifier's false alarms here)
- base+word  share of base pictures (no adapter) called this style when the prompt ends in the style's family
             word ("dotted", "striped", "outlined", "faded"): how much the base gives for free; the adapter
             has to pin down one member of the family (one period, angle, width, amount) under its trigger
- ceiling    share of the held-out scenes, drawn in the style and put through the base's VAE, called this
             style: no generated picture can be sharper than that round trip
- blends     for each pair at 0.5/0.5 with both triggers: share where both styles are called   goal >= 70 %

Adapters, pictures (grids per style) and results.json go to --out; trained adapters are reused on a rerun.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from stylelora.toy import classifiers  # noqa: E402
from stylelora.toy import world as toyworld  # noqa: E402

GOALS = {"fidelity": 0.90, "content_gap": 0.10, "leakage": 0.10, "blend_both": 0.70}


def train_adapters(styles, out: Path, no_reg: bool = False, **overrides) -> dict[str, Path]:
    import stylelora
    from make_style_images import PLAIN, ensure

    folders = ensure(ROOT / "examples" / "styles", styles)
    paths = {}
    for style in styles:
        path = out / f"{style}.safetensors"
        if not path.exists():
            t = time.time()
            stylelora.train(toyworld.train_config(folders[style], toyworld.TRIGGERS[style], path,
                                                  reg_folder=None if no_reg else PLAIN, **overrides))
            print(f"trained {style} in {time.time() - t:.0f} s", flush=True)
        paths[style] = path
    return paths


@torch.no_grad()
def draw(pipe, prompts: list[str], seed: int, steps: int, cfg: float, chunk: int = 10):
    images = []
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(part))]
        images += pipe(part, num_inference_steps=steps, guidance_scale=cfg, generator=gens).images
    return images


def rates(labels, scenes, style: str | None = None) -> dict[str, float]:
    n = len(labels)
    r = {"shape": sum(lab["shape"] == s.shape for lab, s in zip(labels, scenes)) / n,
         "colour": sum(lab["colour"] == s.colour for lab, s in zip(labels, scenes)) / n,
         "content": sum(lab["shape"] == s.shape and lab["colour"] == s.colour for lab, s in zip(labels, scenes)) / n}
    if style:
        r["style"] = sum(style in lab["styles"] for lab in labels) / n
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--styles", default=",".join(toyworld.STYLES))
    p.add_argument("--n", type=int, default=20, help="held-out prompts per measurement")
    p.add_argument("--train-steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--no-reg", action="store_true", help="train on the style set alone (no plain pictures)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the recipe (TrainConfig, flat: lr=2e-3, rank=16, ...); repeatable")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale")
    p.add_argument("--blend", type=float, default=0.5, help="weight of each style in the two-style blends")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "out" / "style-quality"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from stylelora.blend import Blender
    from stylelora.cli import quiet_libraries
    from stylelora.grid import image_grid
    from stylelora.models import load_base

    quiet_libraries()
    t0 = time.time()
    styles = args.styles.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(_parse_set(kv) for kv in args.set)
    if args.train_steps:
        overrides["steps"] = args.train_steps
    adapters = train_adapters(styles, out, no_reg=args.no_reg, **overrides)
    t_train = time.time() - t0

    base = load_base("tiny")
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)
    clf = classifiers.load_classifier()
    scenes = toyworld.held_out_scenes(args.n, seed=args.seed)
    prompts = [s.caption for s in scenes]
    base_imgs = draw(pipe, prompts, args.seed, args.steps, args.cfg)
    base_lab = classifiers.classify(clf, base_imgs)
    base_rates = rates(base_lab, scenes)
    ceiling = vae_ceiling(pipe.vae, clf, scenes, styles)
    family_word = {}
    for style in styles:
        labs = classifiers.classify(clf, draw(pipe, [toyworld.described(s, toyworld.STYLES[style]) for s in scenes],
                                              args.seed, args.steps, args.cfg))
        family_word[style] = sum(style in lab["styles"] for lab in labs) / len(labs)
    blender = Blender(base)
    for style in styles:
        blender.load(adapters[style], name=style)

    results = {"base": base_rates, "styles": {}, "blends": {}, "args": vars(args)}
    for style in styles:
        trigger = toyworld.TRIGGERS[style]
        blender.set({style: 1.0})
        on = draw(pipe, [toyworld.captioned(s, trigger) for s in scenes], args.seed, args.steps, args.cfg)
        off = draw(pipe, prompts, args.seed, args.steps, args.cfg)
        on_r, off_r = rates(classifiers.classify(clf, on), scenes, style), rates(classifiers.classify(clf, off), scenes, style)
        results["styles"][style] = {
            "fidelity": on_r["style"], "content": on_r["content"], "shape": on_r["shape"], "colour": on_r["colour"],
            "leakage": off_r["style"], "base_fp": sum(style in lab["styles"] for lab in base_lab) / len(base_lab),
            "base_content": base_rates["content"], "base_word": family_word[style], "ceiling": ceiling[style]}
        k = min(8, len(prompts))
        image_grid([base_imgs[:k], on[:k], off[:k]], row_labels=["base", f"+{style}, trigger", "no trigger"]
                   ).save(out / f"{style}.png")
    for a, b in itertools.combinations(styles, 2):
        blender.set({a: args.blend, b: args.blend})
        both = [toyworld.captioned(s, toyworld.TRIGGERS[a], toyworld.TRIGGERS[b]) for s in scenes]
        imgs = draw(pipe, both, args.seed, args.steps, args.cfg)
        labs = classifiers.classify(clf, imgs)
        n = len(labs)
        results["blends"][f"{a}+{b}"] = {"both": sum({a, b} <= lab["styles"] for lab in labs) / n,
                                         a: sum(a in lab["styles"] for lab in labs) / n,
                                         b: sum(b in lab["styles"] for lab in labs) / n,
                                         "content": rates(labs, scenes)["content"]}
        image_grid([imgs[:8]], row_labels=[f"{a}+{b}"]).save(out / f"blend-{a}+{b}.png")
    blender.reset()
    results["seconds"] = {"training": round(t_train), "total": round(time.time() - t0)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return results


@torch.no_grad()
def vae_ceiling(vae, clf, scenes, styles) -> dict[str, float]:
    """Per style: share of ``scenes`` drawn in it, encoded and decoded by ``vae``, that the classifier calls it."""
    out = {}
    for style in styles:
        x = classifiers.to_input([toyworld.render(s, toyworld.STYLES[style]) for s in scenes])
        y = classifiers.through(classifiers.vae_roundtrip(vae), x)
        labs = classifiers.classify(clf, classifiers.to_images(y))
        out[style] = sum(style in lab["styles"] for lab in labs) / len(labs)
    return out


def _parse_set(kv: str):
    import ast

    key, _, value = kv.partition("=")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def pct(x: float) -> str:
    return f"{100 * x:5.0f} %"


def print_table(r: dict) -> None:
    base = r["base"]
    print(f"\nbase model on {r['args']['n']} held-out prompts: content {pct(base['content'])} "
          f"(shape {pct(base['shape'])}, colour {pct(base['colour'])})\n")
    print(f"{'style':<10} {'fidelity':>9} {'content':>9} {'vs base':>8} {'leakage':>9} {'base FP':>9} "
          f"{'base+word':>10} {'ceiling':>9}")
    for style, m in r["styles"].items():
        gap = 100 * (m["content"] - m["base_content"])
        print(f"{style:<10} {pct(m['fidelity']):>9} {pct(m['content']):>9} {gap:+7.0f}  {pct(m['leakage']):>9} "
              f"{pct(m['base_fp']):>9} {pct(m['base_word']):>10} {pct(m['ceiling']):>9}")
    if r["blends"]:
        w = r["args"]["blend"]
        print(f"\n{'blend (' + str(w) + ' each)':<22} {'both':>7} {'first':>7} {'second':>7} {'content':>8}")
        for name, m in r["blends"].items():
            a, b = name.split("+")
            print(f"{name:<22} {pct(m['both']):>7} {pct(m[a]):>7} {pct(m[b]):>7} {pct(m['content']):>8}")
    s = r["styles"].values()
    if s:
        ok = {"fidelity >= 90 %": all(m["fidelity"] >= GOALS["fidelity"] for m in s),
              "content within 10 points of base": all(m["base_content"] - m["content"] <= GOALS["content_gap"] for m in s),
              "leakage <= 10 %": all(m["leakage"] <= GOALS["leakage"] for m in s),
              "both styles in >= 70 % of blends": all(m["both"] >= GOALS["blend_both"] for m in r["blends"].values())}
        print("\ngoals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in ok.items()))
    print(f"time: {r['seconds']['total']} s (adapter training {r['seconds']['training']} s)")


if __name__ == "__main__":
    main()
