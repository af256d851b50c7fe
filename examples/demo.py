"""`make demo`: teach the built-in tiny base a style with a LoRA adapter, then draw content the style set never had.

Everything runs offline on a CPU in about a minute. The base is stylelora's ``tiny`` pipeline, pretrained on a
procedural toy world of shapes (examples/pretrain_tiny_base.py): it draws the shape, colour and place a prompt asks
for. The style set is examples/styles/<style>/, 24 toy-world pictures in one procedural style
(examples/make_style_images.py), trained beside the plain pictures of examples/plain/ as regularization images.
The grid's prompts use (shape, colour) pairs that no picture of the style set shows: rows are pictures of the
style set, the base, and the base + adapter with the trigger word.

Honest state (benchmarks/style_quality.py, README "Style quality"): stripes and outline come through clearly on
held-out prompts; the pastel wash shows but is fainter than the style set's; halftone dots mostly do not.

    python examples/demo.py [--style stripes|outline|pastel|halftone] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from make_style_images import PLAIN, ensure  # noqa: E402

import stylelora  # noqa: E402
from stylelora.toy import world as toyworld  # noqa: E402
from stylelora.cli import quiet_libraries  # noqa: E402
from stylelora.data import load_image  # noqa: E402
from stylelora.grid import image_grid  # noqa: E402
from stylelora.models import load_base  # noqa: E402

OUT = HERE.parent / "out" / "demo"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description="Train a style adapter on the tiny base and draw a before/after grid.")
    p.add_argument("--style", default="stripes", choices=list(toyworld.STYLES))
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the recipe's, stylelora.presets.TOY)")
    p.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()),
                   help="torch CPU threads (use 1 when the machine is busy)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries()
    t0 = time.time()
    style, trigger = args.style, toyworld.TRIGGERS[args.style]
    folder = ensure(HERE / "styles", [style])[style]
    held_out = toyworld.held_out_scenes(5, seed=3)
    prompts = [toyworld.captioned(s, trigger) for s in held_out]
    adapter_path = OUT / f"{style}.safetensors"
    config = toyworld.train_config(folder, trigger, adapter_path, reg_folder=PLAIN, style=style,
                                    sample_prompts=prompts[:1],
                                    **({"steps": args.steps} if args.steps else {}))
    stylelora.train(config)
    t_train = time.time() - t0

    base = load_base("tiny")
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)

    def render(texts):
        gens = [torch.Generator().manual_seed(i) for i in range(len(texts))]
        return pipe(texts, num_inference_steps=20, guidance_scale=5.0, generator=gens).images

    before = render([s.caption for s in held_out])
    blender = stylelora.Blender(base)
    blender.load(adapter_path, name=style, weight=1.0)
    after = render(prompts)
    blender.reset()
    examples = [load_image(f) for f in sorted(folder.glob("*.png"))[:len(held_out)]]
    cols = [f"{s.size} {s.colour} {s.shape}" for s in held_out]
    big = lambda images: [im.resize((2 * im.width, 2 * im.height), Image.NEAREST) for im in images]  # noqa: E731
    grid = image_grid([big(examples), big(before), big(after)], col_labels=cols,
                      row_labels=["style set (other content)", "base", f"+ {style} adapter"])
    grid_path = OUT / "before_after.png"
    grid.save(grid_path)
    print(f"adapter: {adapter_path}")
    print(f"grid:    {grid_path}   (columns: shape/colour pairs the style set never shows)")
    print(f"time:    {time.time() - t0:.0f} s (training {t_train:.0f} s)")
    return grid_path


if __name__ == "__main__":
    main()
