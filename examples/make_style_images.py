"""Draw the example style sets: examples/styles/<style>/ with toy-world scenes in each procedural style.

Run: python examples/make_style_images.py [OUT_DIR] [--n 16] [--seed 0]. Deterministic: the same seed gives the
same files. Each picture gets a caption naming its content after the ``{trigger}`` placeholder, as a style data
set should: the caption says *what* is drawn so the adapter learns *how* it is drawn. No picture shows a held-out
(shape, colour) pair (stylelora.toyworld.HELD_OUT_PAIRS), so prompts for those test whether a style carries over.

Styles (stylelora.toyworld.STYLES; default trigger words in TRIGGERS):
  halftone  the shape drawn as a grid of dots       stripes  diagonal stripes over the background
  outline   a thick ink contour around the shape    pastel   everything washed towards white
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from stylelora.toy.world import STYLES, write_plain_folder, write_style_folder  # noqa: E402

N_IMAGES = 24
SEED = 0
PLAIN = HERE / "plain"  # regularization pictures (no style, no trigger) for the recipes


def main(out: Path = HERE / "styles", styles=tuple(STYLES), n: int = N_IMAGES, seed: int = SEED) -> list[Path]:
    """(Re)write one folder per style under ``out``; returns the folders."""
    folders = []
    for style in styles:
        folder = Path(out) / style
        if folder.exists():
            shutil.rmtree(folder)  # a smaller n must not leave old pictures behind
        folders.append(write_style_folder(folder, style, n=n, seed=seed))
    if PLAIN.exists():
        shutil.rmtree(PLAIN)
    write_plain_folder(PLAIN, n=n, seed=seed)
    return folders


def ensure(out: Path = HERE / "styles", styles=tuple(STYLES)) -> dict[str, Path]:
    """The style folders, drawn first where missing."""
    missing = [s for s in styles if not any((Path(out) / s).glob("*.png"))]
    if not any(PLAIN.glob("*.png")):
        write_plain_folder(PLAIN, n=N_IMAGES, seed=SEED)
    if missing:
        main(out, missing)
    return {s: Path(out) / s for s in styles}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Draw the example style sets (toy-world scenes in procedural styles).")
    p.add_argument("out", nargs="?", default=str(HERE / "styles"))
    p.add_argument("--n", type=int, default=N_IMAGES, help="pictures per style")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--styles", default=",".join(STYLES))
    a = p.parse_args()
    for f in main(Path(a.out), a.styles.split(","), a.n, a.seed):
        print(f)
