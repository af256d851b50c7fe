"""Draw the demo's style set: scenes of simple shapes rendered in an 'ink hatching' style (procedural, no downloads).

Run: python examples/make_style_images.py [OUT_DIR]. Deterministic: the same seed gives the same files.
Each image gets a caption naming its content plus the {trigger} placeholder, as a style dataset should:
the caption describes *what* is drawn so the adapter learns *how* it is drawn.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle"]
COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 150, 60), "yellow": (220, 190, 40)}
PAPER = (242, 234, 214)
INK = (30, 25, 20)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box, **kw) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, **kw)
    elif kind == "square":
        draw.rectangle(box, **kw)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], **kw)


def hatch(img: Image.Image, spacing: int, rng: random.Random) -> Image.Image:
    """Cross-hatch every non-paper pixel region with ink lines: the 'style' the adapter should learn."""
    w, h = img.size
    lines = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(lines)
    off = rng.randint(0, spacing)
    for k in range(-h, w + h, spacing):
        d.line([(k + off, 0), (k + off + h, h)], fill=255, width=1)
    mask = img.convert("L").point(lambda v: 255 if v < 225 else 0)
    ink = Image.new("RGB", (w, h), INK)
    out = img.copy()
    out.paste(ink, (0, 0), Image.composite(lines, Image.new("L", (w, h), 0), mask))
    return out


def make_image(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, str]:
    w, h = size
    img = Image.new("RGB", size, PAPER)
    draw = ImageDraw.Draw(img)
    kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    s = rng.randint(min(w, h) // 3, min(w, h) // 2)
    x, y = rng.randint(4, w - s - 4), rng.randint(4, h - s - 4)
    draw_shape(draw, kind, (x, y, x + s, y + s), fill=COLOURS[colour], outline=INK, width=3)
    img = hatch(img, spacing=rng.choice([5, 6, 7]), rng=rng)
    ImageDraw.Draw(img).rectangle((1, 1, w - 2, h - 2), outline=INK, width=2)  # a drawn frame, part of the style
    return img, f"{{trigger}}, a {colour} {kind} on paper"


def main(out: Path, n: int = 12, seed: int = 7) -> Path:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = rng.choice([(128, 128), (192, 128), (128, 192)])  # mixed aspect ratios exercise bucketing
        img, caption = make_image(rng, size)
        img.save(out / f"ink_{i:02d}.png", optimize=True)
        (out / f"ink_{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "styles" / "ink-hatching"))
