"""Style-quality benchmark, offline: does a LoRA adapter learn a style, keep the content, stay behind its trigger,
and blend with another style? On the pretrained ``tiny`` base and the procedural toy-world styles.

    python benchmarks/style_quality.py [--styles halftone,stripes,outline,pastel] [--n 20] [--out DIR]

For each style: train an adapter on examples/styles/<style> with the demo's recipe (stylelora.toy.world.train_config,
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
- base+words for each pair: share of base pictures (no adapter) prompted with both family words ("striped, faded")
             where both styles are called: how often the base draws two looks together by itself; and the pair's
             VAE ceiling (the scenes drawn in both looks through the VAE, both called)

Adapters, pictures (grids per style) and results.json go to --out. A trained adapter is reused only by a rerun with
the same recipe on the same base: its file name carries a hash of the full TrainConfig (less where files are
written), the base's identity and the training pictures, so changing any of them retrains.
"""

from __future__ import annotations

import argparse
import hashlib
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
# TrainConfig fields that say where files go, not what is trained: left out of the recipe key
OUTPUT_FIELDS = (("run", "output"), ("run", "tensorboard_dir"), ("data", "cache_dir"))


def train_adapters(styles, out: Path, no_reg: bool = False, recipe: str | None = None, slots: bool = False,
                   seed_per_style: bool = False, **overrides) -> dict[str, Path]:
    """``recipe=None``: the toy recipe (toyworld.train_config: plain pictures as regularization images, trigger
    tokens started from the style's family word). ``recipe=NAME``: what a user gets from ``stylelora train FOLDER
    --trigger T`` with ``--recipe NAME`` (``default``: no --recipe) or from that web UI preset, on the ``tiny``
    base: the recipe as ``presets.for_base`` scales it, the style folder alone, nothing else chosen.
    ``slots``: style i (in ``styles`` order) trains in orthogonal slot i (``train --slot i``). ``seed_per_style``:
    style i trains with the recipe's seed + i (one seed gives every style the same lora_down init)."""
    import stylelora
    from make_style_images import PLAIN, ensure
    from stylelora.presets import for_base

    folders = ensure(ROOT / "examples" / "styles", styles)
    paths = {}
    for i, style in enumerate(styles):
        if recipe:
            config = for_base(recipe, "tiny").config(
                folder=str(folders[style]), trigger=toyworld.TRIGGERS[style], base="tiny",
                output=str(out / f"{style}.safetensors"), **overrides)
        else:
            config = toyworld.train_config(folders[style], toyworld.TRIGGERS[style], out / f"{style}.safetensors",
                                           reg_folder=None if no_reg else PLAIN, style=style, **overrides)
        if slots:
            config = config.replace(slot=i)
        if seed_per_style:
            config = config.replace(seed=config.run.seed + i)
        path = out / f"{style}-{recipe_key(config)}.safetensors"
        if path.exists():
            print(f"reusing {path.name} (same recipe, base and pictures)", flush=True)
        else:
            t = time.time()
            stylelora.train(config.replace(output=str(path)))
            print(f"trained {style} in {time.time() - t:.0f} s", flush=True)
        paths[style] = path
    return paths


def recipe_key(config) -> str:
    """What decides the trained adapter, hashed: the full TrainConfig less where files are written, the base's
    identity, and the bytes of the training pictures (the style set is regenerated by code that can change)."""
    d = config.to_dict()
    for section, key in OUTPUT_FIELDS:
        d[section].pop(key)
    pictures = [_folder_digest(f) for f in (config.data.folder, toyworld.resolve_reg_folder(config.data.reg_folder))
                if f]
    blob = json.dumps([d, base_identity(config.run.base), pictures], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def base_identity(spec: str) -> str:
    """A built-in base: its version and weights digest (the cache folder's name). A file or folder: names, sizes
    and modification times of its files (hashing a multi-GB checkpoint on every run would be slow). A hub id:
    the id itself."""
    from stylelora.models import TINY, tiny_path

    if spec in TINY:
        return tiny_path(spec).name
    path = Path(spec).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return spec
    return json.dumps([[str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def _folder_digest(folder) -> str:
    h = hashlib.sha256()
    root = Path(folder)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}\n".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


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
    p.add_argument("--recipe", choices=["default", "quick", "standard", "thorough"],
                   help="train as a new user would with this recipe on tiny (CLI defaults or a web UI preset, "
                        "scaled by presets.for_base; style folder alone) instead of the toy recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the recipe (TrainConfig, flat: lr=2e-3, rank=16, ...); repeatable "
                        "(train_tokens=0: the plain-LoRA recipe without learnt trigger tokens)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale")
    p.add_argument("--blend", type=float, default=0.5, help="weight of each style in the two-style blends")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--resize", action="append", default=[], metavar="RULE=VALUE",
                   help="score the trained adapters after `stylelora resize` by this rule instead (energy=0.9, "
                        "budget=200K, rank=4, ratio=4, cumulative=0.9, max_rank=8; repeatable, combined like the CLI's "
                        "options; max_error=EPS measures on the tiny base)")
    p.add_argument("--quantize-base", choices=["fp8", "int8", "nf4"],
                   help="train and score on the tiny base quantized this way (QLoRA); the same adapters are also "
                        "scored on the full base, and the quantized UNet's output error on fixed inputs is reported")
    p.add_argument("--slots", action="store_true",
                   help="train style i (in --styles order) in orthogonal slot i (train --slot i), for blending")
    p.add_argument("--zip", action="store_true",
                   help="blend rows: a ZipLoRA merge (merge --method zip) of each pair, both sources at --blend, "
                        "loaded at weight 1, instead of blending the pair at --blend each")
    p.add_argument("--zip-steps", type=int, default=100, help="ZipLoRA optimisation steps per pair (with --zip)")
    p.add_argument("--zip-lr", type=float, default=0.01, help="ZipLoRA coefficients' Adam learning rate (with --zip)")
    p.add_argument("--zip-lambda", type=float, default=0.01,
                   help="ZipLoRA similarity penalty weight (with --zip; on tiny, 0.01 outweighs the distillation "
                        "loss and shrinks every coefficient: mean 0.22 after 100 steps on the recipe adapters)")
    p.add_argument("--blocks", choices=["auto"],
                   help="blend rows: per-block weights chosen by the blend report (interference.suggest_blocks on "
                        "each pair at --blend each): a block where the pair's updates overlap goes to the adapter "
                        "with the larger share of its update there, at the pair's summed weight, the other 0")
    p.add_argument("--block-threshold", type=float, default=0.3,
                   help="with --blocks auto: the input overlap (0..1) from which a block is contested")
    p.add_argument("--seed-per-style", action="store_true",
                   help="train style i with the recipe's seed + i: with one seed every plain LoRA starts from the "
                        "same lora_down, and a 300-step tiny recipe run kept most of it (down factors of two styles "
                        "0.92 cosine alike; blend-report input overlap 0.48-0.59 between styles)")
    p.add_argument("--decompose", action="store_true",
                   help="also score each style alone at --blend, and at 1.0 with another style's trigger word in the "
                        "prompt but that style's LoRA off: what a blend loses to the words rather than the weights")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "out" / "style-quality"))
    args = p.parse_args(argv)
    if args.blocks and args.zip:
        p.error("--blocks auto and --zip are two kinds of blend row: choose one")
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
    if args.quantize_base:
        overrides["quantize_base"] = args.quantize_base
    adapters = train_adapters(styles, out, no_reg=args.no_reg, recipe=args.recipe, slots=args.slots,
                              seed_per_style=args.seed_per_style, **overrides)
    t_train = time.time() - t0

    base = load_base("tiny", quantize=args.quantize_base)
    trained_sizes = {style: path.stat().st_size for style, path in adapters.items()}
    if args.resize:
        adapters = resize_adapters(adapters, dict(_parse_set(kv) for kv in args.resize), base)
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
    pair_words = {}  # the base alone, both family words: how often it draws two looks together by itself
    pair_ceiling = {}  # the scenes drawn in both looks through the VAE: what the classifier can see of a pair
    for a, b in itertools.combinations(styles, 2):
        labs = classifiers.classify(clf, draw(pipe, [toyworld.described(s, toyworld.look_of([a, b])) for s in scenes],
                                              args.seed, args.steps, args.cfg))
        pair_words[f"{a}+{b}"] = sum({a, b} <= lab["styles"] for lab in labs) / len(labs)
        pair_ceiling[f"{a}+{b}"] = vae_ceiling(pipe.vae, clf, scenes, [(a, b)])[(a, b)]
    blender = Blender(base)
    for style in styles:
        blender.load(adapters[style], name=style)

    results = {"base": base_rates, "styles": {}, "blends": {}, "args": vars(args),
               "adapters": {style: path.name for style, path in adapters.items()}}
    for style in styles:
        trigger = toyworld.TRIGGERS[style]
        blender.set({style: 1.0})
        on = draw(pipe, [toyworld.captioned(s, trigger) for s in scenes], args.seed, args.steps, args.cfg)
        off = draw(pipe, prompts, args.seed, args.steps, args.cfg)
        on_r, off_r = rates(classifiers.classify(clf, on), scenes, style), rates(classifiers.classify(clf, off), scenes, style)
        results["styles"][style] = {
            "fidelity": on_r["style"], "content": on_r["content"], "shape": on_r["shape"], "colour": on_r["colour"],
            "leakage": off_r["style"], "base_fp": sum(style in lab["styles"] for lab in base_lab) / len(base_lab),
            "base_content": base_rates["content"], "base_word": family_word[style], "ceiling": ceiling[style],
            "size": adapters[style].stat().st_size, "trained_size": trained_sizes[style]}
        k = min(8, len(prompts))
        image_grid([base_imgs[:k], on[:k], off[:k]], row_labels=["base", f"+{style}, trigger", "no trigger"]
                   ).save(out / f"{style}.png")
    if args.zip:  # the merged pairs carry the styles' trigger tokens: the single styles leave the blend first
        blender.reset()
        for style in styles:
            blender.unload(style)
    for a, b in itertools.combinations(styles, 2):
        if args.zip:  # learnt on the pristine base, then the merged pair alone at weight 1
            zipped = zip_pair(adapters[a], adapters[b], args.blend, base, args.zip_steps, args.zip_lr, args.zip_lambda)
            blender.set({blender.load(zipped, name=f"zip-{a}+{b}"): 1.0})
        elif args.blocks == "auto":  # the report's vectors for this pair at (--blend, --blend)
            weights, chosen = auto_blocks(a, b, adapters, args.blend, pipe, args.block_threshold)
            blender.set(weights)
        else:
            blender.set({a: args.blend, b: args.blend})
        both = [toyworld.captioned(s, toyworld.TRIGGERS[a], toyworld.TRIGGERS[b]) for s in scenes]
        imgs = draw(pipe, both, args.seed, args.steps, args.cfg)
        labs = classifiers.classify(clf, imgs)
        n = len(labs)
        results["blends"][f"{a}+{b}"] = {"both": sum({a, b} <= lab["styles"] for lab in labs) / n,
                                         a: sum(a in lab["styles"] for lab in labs) / n,
                                         b: sum(b in lab["styles"] for lab in labs) / n,
                                         "content": rates(labs, scenes)["content"],
                                         "base_words": pair_words[f"{a}+{b}"],
                                         "ceiling": pair_ceiling[f"{a}+{b}"]}
        if args.blocks == "auto":
            results["blends"][f"{a}+{b}"]["blocks"] = chosen
        image_grid([imgs[:8]], row_labels=[f"{a}+{b}"]).save(out / f"blend-{a}+{b}.png")
        if args.zip:
            blender.reset()
            blender.unload(f"zip-{a}+{b}")
    blender.reset()
    if args.decompose:
        results["decompose"] = decompose(args, blender, styles, scenes, clf, pipe)
    if args.quantize_base:
        results["quantized"] = quantized_drift(args, adapters, styles, scenes, clf, base)
    results["seconds"] = {"training": round(t_train), "total": round(time.time() - t0)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return results


def auto_blocks(a: str, b: str, adapters: dict[str, Path], weight: float, pipe, threshold: float):
    """--blocks auto: the ``Blender.set`` weights of the pair (a, b), each ``BlockWeight(weight, vector)`` with
    ``interference.suggest_blocks``' vectors at (weight, weight), and the vectors' lbw= strings."""
    from stylelora.blend import read_adapter
    from stylelora.blocks import BlockWeight
    from stylelora.interference import suggest_blocks

    pair = [(s, read_adapter(adapters[s], pipe=pipe)) for s in (a, b)]
    chosen = suggest_blocks(pair, {a: weight, b: weight}, pipe.unet.config, threshold=threshold)
    return {s: BlockWeight(weight, chosen[s]) for s in (a, b)}, {s: chosen[s].text() for s in (a, b)}


def decompose(args, blender, styles, scenes, clf, pipe) -> dict:
    """--decompose: what a blend loses, split. Per style: detected alone at --blend with its own trigger, and at 1.0
    with another style's trigger word also in the prompt but that style's LoRA off (its learnt tokens inserted by
    hand: the Blender adds them only with a nonzero weight) — the share lost to the words, not to the weights."""
    from stylelora.blend import encoders, insert_tokens, remove_tokens

    def rate(style, prompts):
        labs = classifiers.classify(clf, draw(pipe, prompts, args.seed, args.steps, args.cfg))
        return sum(style in lab["styles"] for lab in labs) / len(labs)

    out = {}
    for a in styles:
        blender.set({a: args.blend})
        row = {"alone": rate(a, [toyworld.captioned(s, toyworld.TRIGGERS[a]) for s in scenes])}
        blender.set({a: 1.0})
        for b in styles:
            if b == a:
                continue
            embs = list(blender.loaded[b].adapter.embeddings.values())
            insert_tokens(pipe, embs)
            try:  # the triggers in the benchmark's order, as the blend rows write them
                words = [toyworld.TRIGGERS[x] for x in styles if x in (a, b)]
                row[f"with {b} word"] = rate(a, [toyworld.captioned(s, *words) for s in scenes])
            finally:
                for emb in reversed(embs):
                    for comp in encoders(pipe):
                        remove_tokens(pipe, emb, comp)
        out[a] = row
        print(f"{a}: alone at {args.blend} {pct(row['alone']).strip()}; at 1.0 with another style's word (its LoRA "
              "off): " + ", ".join(f"{k.split()[1]} {pct(v).strip()}" for k, v in row.items() if k != "alone"),
              flush=True)
    blender.reset()
    return out


def quantized_drift(args, adapters: dict[str, Path], styles, scenes, clf, qbase) -> dict:
    """With --quantize-base: the quantized tiny UNet's output error against the full one on fixed inputs, and each
    adapter (trained on the quantized base) scored again on the full base: what moving it there changes."""
    from stylelora.blend import Blender
    from stylelora.models import load_base

    full = load_base("tiny")
    full.pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    unet = full.pipe.unet
    x = torch.randn(8, unet.config.in_channels, 16, 16, generator=g)
    t = torch.linspace(0, 999, 8).long()
    c = torch.randn(8, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref, out = unet(x, t, c).sample, qbase.pipe.unet.to(x.device)(x, t, c).sample.float()
    drift = {"unet_rel_error": float((out - ref).norm() / ref.norm()), "unet_max_abs_error": float((out - ref).abs().max()),
             "full_base": {}}
    blender = Blender(full)
    prompts = [s.caption for s in scenes]
    for style in styles:
        blender.load(adapters[style], name=style)
        blender.set({style: 1.0})
        on = draw(full.pipe, [toyworld.captioned(s, toyworld.TRIGGERS[style]) for s in scenes], args.seed, args.steps,
                  args.cfg)
        off = draw(full.pipe, prompts, args.seed, args.steps, args.cfg)
        on_r = rates(classifiers.classify(clf, on), scenes, style)
        drift["full_base"][style] = {"fidelity": on_r["style"], "content": on_r["content"],
                                     "leakage": rates(classifiers.classify(clf, off), scenes, style)["style"]}
    blender.reset()
    return drift


def zip_pair(path_a: Path, path_b: Path, weight: float, base, steps: int, lr: float = 0.01, lam: float = 0.01):
    """The ZipLoRA merge of two adapter files at ``weight`` each (``merge --method zip``; each learns on the
    training folder its metadata records), as an in-memory adapter; its losses printed."""
    from stylelora.formats import load_adapter
    from stylelora.merge import Source
    from stylelora.zipmerge import ZipOptions, zip_merge

    sources = [Source(load_adapter(p, pipe=base.pipe), weight, weight, origin=str(p)) for p in (path_a, path_b)]
    t = time.time()
    zipped = zip_merge(sources, base.pipe, options=ZipOptions(steps=steps, lr=lr, lam=lam),
                       name=f"zip-{path_a.stem}+{path_b.stem}")
    rec = zipped.record
    if rec["last"]:
        print(f"zip {path_a.stem}+{path_b.stem}: {steps} steps in {time.time() - t:.0f} s, distillation "
              f"{rec['first']['distill']} -> {rec['last']['distill']}, mean coefficients {rec['mean_m']}", flush=True)
    return zipped.merge.adapter


def resize_adapters(adapters: dict[str, Path], rule: dict, base) -> dict[str, Path]:
    """Each trained adapter resized by ``rule`` (the keyword arguments of ``stylelora.resize.resize``) into a file
    beside it named by the rule; ranks, energy kept and sizes printed as ``stylelora resize`` prints them."""
    from stylelora.cli.resize import format_table
    from stylelora.resize import resize_file

    tag = "-".join(f"{k}{v}" for k, v in sorted(rule.items()))
    out = {}
    for style, path in adapters.items():
        target = path.with_name(f"{path.stem}-resize-{tag}.safetensors")
        needs_base = "max_error" in rule
        made, result = resize_file(path, target, pipe=base if needs_base else None, overwrite=True, **rule)
        print(f"{style}: resized by {tag}\n{format_table(result, path.stat().st_size, made.stat().st_size)}",
              flush=True)
        out[style] = made
    return out


@torch.no_grad()
def vae_ceiling(vae, clf, scenes, styles) -> dict:
    """Per style (a name, or a tuple of names drawn together): share of ``scenes`` drawn in it, encoded and decoded
    by ``vae``, that the classifier calls it (every one of them, for a tuple)."""
    out = {}
    for style in styles:
        names = set(style) if isinstance(style, tuple) else {style}
        x = classifiers.to_input([toyworld.render(s, toyworld.look_of(sorted(names))) for s in scenes])
        y = classifiers.through(classifiers.vae_roundtrip(vae), x)
        labs = classifiers.classify(clf, classifiers.to_images(y))
        out[style] = sum(names <= lab["styles"] for lab in labs) / len(labs)
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
          f"{'base+word':>10} {'ceiling':>9} {'file':>9}")
    for style, m in r["styles"].items():
        gap = 100 * (m["content"] - m["base_content"])
        size = f"{m['size'] / 1024:.0f} KiB" if "size" in m else "-"
        print(f"{style:<10} {pct(m['fidelity']):>9} {pct(m['content']):>9} {gap:+7.0f}  {pct(m['leakage']):>9} "
              f"{pct(m['base_fp']):>9} {pct(m['base_word']):>10} {pct(m['ceiling']):>9} {size:>9}")
    if r["blends"]:
        w = r["args"]["blend"]
        print(f"\n{'blend (' + str(w) + ' each)':<22} {'both':>7} {'first':>7} {'second':>7} {'content':>8} "
              f"{'base+words':>11} {'ceiling':>8}")
        for name, m in r["blends"].items():
            a, b = name.split("+")
            words = pct(m["base_words"]) if "base_words" in m else "-"
            ceiling = pct(m["ceiling"]) if "ceiling" in m else "-"
            print(f"{name:<22} {pct(m['both']):>7} {pct(m[a]):>7} {pct(m[b]):>7} {pct(m['content']):>8} {words:>11} "
                  f"{ceiling:>8}")
            if "blocks" in m:
                print(f"{'':<4}blocks " + "; ".join(f"{s} lbw={v}" for s, v in m["blocks"].items()))
    s = r["styles"].values()
    if s:
        ok = {"fidelity >= 90 %": all(m["fidelity"] >= GOALS["fidelity"] for m in s),
              "content within 10 points of base": all(m["base_content"] - m["content"] <= GOALS["content_gap"] for m in s),
              "leakage <= 10 %": all(m["leakage"] <= GOALS["leakage"] for m in s),
              "both styles in >= 70 % of blends": all(m["both"] >= GOALS["blend_both"] for m in r["blends"].values())}
        print("\ngoals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in ok.items()))
    if "quantized" in r:
        q = r["quantized"]
        print(f"\n{r['args']['quantize_base']} base: UNet output {100 * q['unet_rel_error']:.2f} % off the full base "
              f"(relative L2, fixed inputs; max abs {q['unet_max_abs_error']:.3f}). Same adapters on the full base:")
        print(f"{'style':<10} {'fidelity':>9} {'content':>9} {'leakage':>9}   (on the {r['args']['quantize_base']} base)")
        for style, m in q["full_base"].items():
            mq = r["styles"][style]
            print(f"{style:<10} {pct(m['fidelity']):>9} {pct(m['content']):>9} {pct(m['leakage']):>9}   "
                  f"({pct(mq['fidelity']).strip()}, {pct(mq['content']).strip()}, {pct(mq['leakage']).strip()})")
    print(f"time: {r['seconds']['total']} s (adapter training {r['seconds']['training']} s)")


if __name__ == "__main__":
    main()
