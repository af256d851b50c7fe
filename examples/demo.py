"""`make demo`: train an ink-hatching style adapter on the built-in tiny base, then write a before/after grid.

Everything runs offline on a CPU in about a minute: the style images are drawn by examples/make_style_images.py,
the base model is stylelora's built-in `tiny` pipeline (random weights until a pretrained tiny base lands, so the
pictures show *that* the adapter changes the output, not yet a recognisable style).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_style_images import main as make_style_images  # noqa: E402

import stylelora  # noqa: E402
from stylelora import lora  # noqa: E402
from stylelora.cli import quiet_libraries  # noqa: E402
from stylelora.formats import load_adapter  # noqa: E402
from stylelora.grid import image_grid  # noqa: E402
from stylelora.models import load_base  # noqa: E402

OUT = HERE.parent / "out" / "demo"
PROMPTS = ["inkhatch, a red circle on paper", "inkhatch, a blue square on paper", "a green triangle", "a lighthouse"]
SEEDS = [1, 2]


def main() -> None:
    quiet_libraries()
    t0 = time.time()
    styles = HERE / "styles" / "ink-hatching"
    if not any(styles.glob("*.png")):
        make_style_images(styles)
    config = stylelora.TrainConfig(
        data=stylelora.DataConfig(folder=str(styles), trigger="inkhatch", resolution=128, random_flip=True),
        network=stylelora.NetworkConfig(rank=8, train_text_encoder=True),
        optim=stylelora.OptimConfig(lr=1e-3, te_lr=2e-4, lr_scheduler="cosine", warmup_steps=10),
        run=stylelora.RunConfig(base="tiny", output=str(OUT / "ink-hatching.safetensors"), steps=100, batch_size=4,
                                checkpoint_every=50, sample_prompts=[PROMPTS[0]], sample_steps=12, seed=0),
    )
    adapter_path = stylelora.train(config)
    t_train = time.time() - t0

    base = load_base("tiny")
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)

    def render():
        return [pipe(p, num_inference_steps=12, height=128, width=128,
                     generator=torch.Generator().manual_seed(s)).images[0] for p in PROMPTS for s in SEEDS]

    before = render()
    lora.attach(pipe, load_adapter(adapter_path, pipe=pipe), "ink")
    after = render()
    cols = [f"{p[:22]}… s{s}" if len(p) > 22 else f"{p} s{s}" for p in PROMPTS for s in SEEDS]
    grid = image_grid([before, after], row_labels=["base", "+ adapter"], col_labels=cols)
    grid_path = OUT / "before_after.png"
    grid.save(grid_path)
    print(f"adapter: {adapter_path}")
    print(f"grid:    {grid_path}")
    print(f"samples: {OUT / 'ink-hatching-samples'}")
    print(f"time:    {time.time() - t0:.0f} s (training {t_train:.0f} s)")


if __name__ == "__main__":
    main()
