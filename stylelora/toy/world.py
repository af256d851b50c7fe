"""A procedural "toy world": captioned pictures of simple shapes, and the picture styles the benchmark teaches.

A ``Scene`` is what a picture shows (shape, colour, size, position, background); a ``Look`` is how it is drawn
(halftone dots, background stripes, ink outline, pastel wash, or any mix). ``render(scene, look)`` draws it with
numpy at twice the size and averages down (anti-aliased edges), so the same scene, look and size always give the
same pixels. Everything random takes a ``random.Random``; a seed fixes a whole data set.

The built-in ``tiny`` base is pretrained on plain scenes (examples/pretrain_tiny_base.py); the named ``STYLES``
are what examples/styles/ and benchmarks/style_quality.py teach it as LoRA adapters.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # picture side (px) of the pretrained ``tiny`` base, its style sets and the benchmark
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 45), "green": (45, 165, 70), "blue": (45, 85, 215), "yellow": (235, 200, 40),
           "purple": (145, 65, 185)}
BACKGROUNDS = {"white": (240, 240, 236), "black": (24, 24, 28), "gray": (128, 128, 128)}
SIZES = {"small": 0.27, "large": 0.47}  # shape side as a fraction of the picture side
POSITIONS = {"top left": (0.29, 0.29), "top right": (0.71, 0.29), "bottom left": (0.29, 0.71),
             "bottom right": (0.71, 0.71), "in the center": (0.5, 0.5)}

# (shape, colour) pairs the style sets never show: benchmarks and the demo prompt them to see whether a style
# carries over to content it was not trained on. Every shape and every colour still appears in the style sets.
HELD_OUT_PAIRS = tuple((s, c) for i, s in enumerate(SHAPES) for j, c in enumerate(COLOURS) if (i + j) % 3 == 0)
STYLE_PAIRS = tuple((s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELD_OUT_PAIRS)
ALL_PAIRS = tuple((s, c) for s in SHAPES for c in COLOURS)


@dataclass(frozen=True)
class Scene:
    """What a picture shows. ``dx``/``dy`` (fractions of the side) and ``scale`` jitter the layout slightly."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background, {self.position}"

    @property
    def labels(self) -> tuple[int, int]:
        """(shape index, colour index), the classes the content classifier predicts."""
        return SHAPES.index(self.shape), list(COLOURS).index(self.colour)


@dataclass(frozen=True)
class Look:
    """How a scene is drawn. Zero / None means "off"; combine looks with ``a | b``."""

    dots: tuple[float, float] | None = None  # halftone the shape: (period px, dot radius px)
    stripes: tuple[float, float, float] | None = None  # stripes on the background: (period px, width px, angle deg)
    outline: float = 0.0  # ink contour width in px (black ink; white on dark backgrounds)
    wash: float = 0.0  # blend the whole picture towards white by this amount

    def __or__(self, other: "Look") -> "Look":
        return Look(dots=other.dots or self.dots, stripes=other.stripes or self.stripes,
                    outline=other.outline or self.outline, wash=other.wash or self.wash)


PLAIN = Look()
# The benchmark's styles, in units of a 128 px picture (textures scale with the picture). Periods are multiples
# of 8 units along the axes (4 px in a 64 px picture, the VAE's downsampling factor), so every latent pixel
# covers the same part of a texture, and no texture is finer than the base's VAE can draw: an 8 px dot grid,
# 4 px wide ink, diagonal stripes 4 px wide every 16 px along an axis. (The first base's 4 px dot grid and 2 px
# diagonal stripes came back from its VAE as blur and as a checkerboard.)
STYLES = {
    "halftone": Look(dots=(16.0, 6.0)),
    "stripes": Look(stripes=(32 / math.sqrt(2), 8.0, 45.0)),
    "outline": Look(outline=8.0),
    "pastel": Look(wash=0.55),
}
# default trigger word per style (short: the byte-level tokenizer spends one token per character)
TRIGGERS = {"halftone": "htone", "stripes": "stripy", "outline": "inkline", "pastel": "pastl"}
# The words the ``tiny`` base's captions use for each look family (any period, width, angle or amount): the base
# knows "dotted" pictures as Stable Diffusion knows "halftone" ones. A style adapter teaches one member of a
# family (one period, one angle...) under its own trigger word; the style sets never use these words.
LOOK_WORDS = {"dots": "dotted", "stripes": "striped", "outline": "outlined", "wash": "faded"}


def look_families(look: Look) -> tuple[str, ...]:
    """The families (``LOOK_WORDS`` keys) of the textures ``look`` has on, in a fixed order (dots, stripes, ...)."""
    on = {"dots": look.dots is not None, "stripes": look.stripes is not None, "outline": bool(look.outline),
          "wash": bool(look.wash)}
    return tuple(k for k in LOOK_WORDS if on[k])


def look_words(look: Look) -> tuple[str, ...]:
    """The family words of the textures ``look`` has on, in the order of ``look_families``."""
    return tuple(LOOK_WORDS[k] for k in look_families(look))


# each benchmark style is one member of one family: {"halftone": "dots", "stripes": "stripes", ...}
STYLE_FAMILIES = {name: look_families(look)[0] for name, look in STYLES.items()}


def vocabulary() -> tuple[str, ...]:
    """Every word a caption can hold (the ``tiny`` base's tokenizer makes each one a single token)."""
    words = {"a", "on", "background"} | set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES)
    words |= set(LOOK_WORDS.values())
    words |= {w for pos in POSITIONS for w in pos.split()}
    return tuple(sorted(words))


def look_of(styles) -> Look:
    """The combined look of style names (``"halftone"``, ``["halftone", "outline"]``, ``()`` = plain)."""
    names = [styles] if isinstance(styles, str) else list(styles)
    look = PLAIN
    for name in names:
        look = look | STYLES[name]
    return look


def sample_scene(rng: random.Random, pairs=ALL_PAIRS, *, jitter: float = 0.03) -> Scene:
    """A random scene whose (shape, colour) is one of ``pairs``; ``jitter`` moves/scales it a little."""
    shape, colour = pairs[rng.randrange(len(pairs))]
    return Scene(shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), rng.choice(list(BACKGROUNDS)),
                 dx=rng.uniform(-jitter, jitter), dy=rng.uniform(-jitter, jitter),
                 scale=rng.uniform(1 - 3 * jitter, 1 + 3 * jitter))


def scenes(n: int, seed: int, pairs=ALL_PAIRS, *, jitter: float = 0.03) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, pairs, jitter=jitter) for _ in range(n)]


def _random_family(rng: random.Random, family: str) -> Look:
    """One look family with random parameters; the ranges hold the benchmark's styles and much else."""
    if family == "dots":
        period = rng.uniform(10, 22)
        return Look(dots=(period, period * rng.uniform(0.28, 0.42)))
    if family == "stripes":
        period = rng.uniform(8, 20)
        return Look(stripes=(period, period * rng.uniform(0.25, 0.5), rng.uniform(0, 180)))
    if family == "outline":
        return Look(outline=rng.uniform(3, 10))
    return Look(wash=rng.uniform(0.25, 0.7))


def other_member(rng: random.Random, family: str) -> Look:
    """A member of ``family`` clearly unlike that family's style: dots on a finer or coarser grid, stripes at
    another angle, a thin outline, a light wash. The classifier learns these as *not* the style, so fidelity
    means the style itself, not any picture of its family (which the base draws from the family word alone)."""
    if family == "dots":
        period = rng.uniform(9, 12) if rng.random() < 0.5 else rng.uniform(21, 26)
        return Look(dots=(period, period * rng.uniform(0.28, 0.42)))
    if family == "stripes":
        period = rng.uniform(8, 20)
        return Look(stripes=(period, period * rng.uniform(0.25, 0.5), (45 + rng.uniform(40, 140)) % 180))
    if family == "outline":
        return Look(outline=rng.uniform(2.0, 4.0))
    return Look(wash=rng.uniform(0.18, 0.32))


def random_look(rng: random.Random, p: float = 0.35) -> Look:
    """A random mix of textures with random parameters (periods, widths, angles): each family on with chance p."""
    look = PLAIN
    for family in LOOK_WORDS:
        if rng.random() < p:
            look = look | _random_family(rng, family)
    return look


def pretraining_look(rng: random.Random) -> Look:
    """What the ``tiny`` base's UNet is trained on: 45 % plain, 35 % one look family, 20 % two (random members)."""
    k = rng.choices([0, 1, 2], weights=[0.45, 0.35, 0.20])[0]
    look = PLAIN
    for family in rng.sample(list(LOOK_WORDS), k):
        look = look | _random_family(rng, family)
    return look


def described(scene: Scene, look: Look = PLAIN) -> str:
    """The pretraining caption: the scene's caption, then the family word of each texture on (``look_words``)."""
    return captioned(scene, *look_words(look))


# ------------------------------------------------------------------------------------------------- drawing
def _box(scene: Scene, side: float) -> tuple[float, float, float, float]:
    cx, cy = POSITIONS[scene.position]
    half = SIZES[scene.size] * scene.scale * side / 2
    cx, cy = (cx + scene.dx) * side, (cy + scene.dy) * side
    return cx - half, cy - half, cx + half, cy + half


def _shape_mask(scene: Scene, side: int, *, outline: float = 0.0) -> np.ndarray:
    """Boolean mask of the shape (or, with ``outline`` > 0, of its contour that wide) at ``side`` px."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = _box(scene, side)
    kw = {"fill": None, "outline": 255, "width": max(1, round(outline))} if outline else {"fill": 255}
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), **kw)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), **kw)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], **kw)
    return np.asarray(mask) > 127


def _ink(background: tuple[int, int, int]) -> np.ndarray:
    """Ink that shows on the background: near-black, or near-white on dark backgrounds."""
    light = sum(background) / 3 > 80
    return np.array((25, 25, 30) if light else (235, 235, 230), dtype=np.float32)


def render(scene: Scene, look: Look = PLAIN, size: int = SIZE, *, supersample: int = 2) -> Image.Image:
    """Draw ``scene`` in ``look`` as a ``size`` x ``size`` RGB picture."""
    ss = supersample
    side = size * ss
    coords = (np.arange(side, dtype=np.float32) + 0.5) / ss * (128 / size)  # texture units: px of a 128 picture
    x, y = np.meshgrid(coords, coords)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    img = np.empty((side, side, 3), dtype=np.float32)
    img[:] = bg
    shape = _shape_mask(scene, side)
    ink = _ink(BACKGROUNDS[scene.background])
    if look.stripes:
        period, width, angle = look.stripes
        a = math.radians(angle)
        on = np.mod(x * math.cos(a) + y * math.sin(a), period) < width
        img[on & ~shape] = 0.5 * bg + 0.5 * ink
    fill = shape
    if look.dots:
        period, radius = look.dots
        dist2 = (np.mod(x, period) - period / 2) ** 2 + (np.mod(y, period) - period / 2) ** 2
        fill = shape & (dist2 < radius**2)
    img[fill] = np.array(COLOURS[scene.colour], dtype=np.float32)
    if look.outline:
        img[_shape_mask(scene, side, outline=look.outline * ss * size / 128)] = ink  # width in 128-px units
    if look.wash:
        img = img * (1 - look.wash) + 255.0 * look.wash
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------------------ data sets
def captioned(scene: Scene, *triggers: str) -> str:
    """The scene's caption with trigger words *after* it.

    The ``tiny`` base's text encoder only ever saw captions of one template, each word at its usual position; a
    trigger in front would move every content word to a position it never had there and garble the content. At
    the end it leaves them where they were (a big pretrained text encoder does not care, this one does).
    """
    return ", ".join([scene.caption, *triggers])


def balanced_scenes(n: int, rng: random.Random, pairs=STYLE_PAIRS, *, jitter: float = 0.03) -> list[Scene]:
    """``n`` scenes whose (shape, colour) pairs, backgrounds, sizes and positions each come round in turn (every
    value about equally often, combined at random): a small data set then still shows every background and pair.
    A style set drawn at random can miss one (16 random pictures once held a single black background, and the
    adapter never learnt to wash black)."""
    def cycled(values):
        seq = [values[i % len(values)] for i in range(n)]
        rng.shuffle(seq)
        return seq

    return [Scene(shape, colour, size, position, background, dx=rng.uniform(-jitter, jitter),
                  dy=rng.uniform(-jitter, jitter), scale=rng.uniform(1 - 3 * jitter, 1 + 3 * jitter))
            for (shape, colour), size, position, background in zip(
                cycled(list(pairs)), cycled(list(SIZES)), cycled(list(POSITIONS)), cycled(list(BACKGROUNDS)))]


def write_style_folder(folder: str | Path, style: str | None, *, n: int = 24, seed: int = 0, size: int = SIZE,
                       trigger: str | None = "{trigger}") -> Path:
    """A style's training folder: ``n`` balanced scenes (``balanced_scenes``, never a held-out pair) in that style,
    each with a caption file.

    Captions name the content and end with ``trigger`` (the ``{trigger}`` placeholder by default, which
    ``stylelora train --trigger WORD`` fills in), so the adapter learns *how* things are drawn, not *what*.
    ``style=None`` draws plain pictures captioned without a trigger: regularization images, so an adapter also
    learns what to leave alone (``DataConfig.reg_folder``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = style or "plain"
    look = look_of(style) if style else PLAIN
    for i, scene in enumerate(balanced_scenes(n, random.Random(f"{name}:{seed}"))):
        stem = f"{name}_{i:02d}"
        render(scene, look, size).save(folder / f"{stem}.png", optimize=True)
        caption = captioned(scene, trigger) if style and trigger else scene.caption
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def write_plain_folder(folder: str | Path, *, n: int = 24, seed: int = 0, size: int = SIZE) -> Path:
    """Regularization pictures for the style recipes: ``n`` plain balanced scenes captioned without a trigger."""
    return write_style_folder(folder, None, n=n, seed=seed, size=size)


def plain_folder() -> Path:
    """The toy world's plain pictures (``write_plain_folder`` defaults: the same 24 as examples/plain) in a folder
    under $STYLELORA_HOME, written once (atomically) and reused: what ``reg_folder = "toy:plain"``
    (``presets.TOY_PLAIN``, the tiny-scaled recipes' default) trains on."""
    from ..atomic import atomic_folder
    from ..models import stylelora_home

    dest = stylelora_home() / f"toy-plain-{SIZE}px"
    if not (dest / "plain_23.txt").exists():
        with atomic_folder(dest) as tmp:
            write_plain_folder(tmp)
    return dest


def resolve_reg_folder(value: str | None) -> str | None:
    """``reg_folder`` as a path: ``"toy:plain"`` becomes ``plain_folder()``; anything else is returned as is."""
    from ..presets import TOY_PLAIN

    return str(plain_folder()) if value == TOY_PLAIN else value


def held_out_scenes(n: int, seed: int = 0) -> list[Scene]:
    """Scenes of held-out (shape, colour) pairs only, with every pair equally often."""
    rng = random.Random(f"held-out:{seed}")
    return [replace(sample_scene(rng, jitter=0.0), shape=s, colour=c)
            for s, c in (HELD_OUT_PAIRS[i % len(HELD_OUT_PAIRS)] for i in range(n))]


def train_config(folder: str | Path, trigger: str, output: str | Path, reg_folder: str | Path | None = None,
                 style: str | None = None, **overrides):
    """The recipe the demo and benchmarks/style_quality.py use for a toy-world style on the ``tiny`` base.

    With ``reg_folder`` (plain pictures, ``write_plain_folder``) it is ``stylelora.presets.TOY``: both sets, which
    keeps the content and the untriggered pictures closer to the base; without, ``TOY_NO_REG`` on the style set
    alone. The numbers and why they were chosen are in stylelora/presets.py; what was tried and measured is in the
    README's "Style quality" section. ``style`` (a name in ``STYLES``): the learnt trigger tokens start from the
    word the base knows for that style's look family (``LOOK_WORDS``), unless ``overrides`` name a ``token_init``.
    ``overrides``: flat TrainConfig fields, applied after the recipe.
    """
    from ..presets import TOY, TOY_NO_REG

    if style is not None and "token_init" not in overrides:
        overrides["token_init"] = LOOK_WORDS[STYLE_FAMILIES[style]]
    recipe = TOY if reg_folder else TOY_NO_REG
    return recipe.config(folder=str(folder), trigger=trigger, output=str(output),
                         reg_folder=str(reg_folder) if reg_folder else None, **overrides)
