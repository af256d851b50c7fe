"""Toy-world classifiers: what a picture shows (shape, colour) and how it is drawn (which styles), for benchmarks.

One small CNN with three heads, trained on procedural pictures (stylelora/toy/world.py) in every style and every
pair of styles, blurred and noised a little so it also reads a diffusion model's softer drawings. The committed
weights are ``stylelora/toy/assets/toyworld-classifier.safetensors`` (made by examples/pretrain_tiny_base.py).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from . import world as toyworld

STYLE_NAMES = tuple(toyworld.STYLES)
COLOUR_NAMES = tuple(toyworld.COLOURS)
CLASSIFIER_WEIGHTS = Path(__file__).resolve().parent / "assets" / "toyworld-classifier.safetensors"
INPUT = toyworld.SIZE  # pictures are resized to INPUT x INPUT (area average) before the network sees them


class ToyClassifier(nn.Module):
    """Conv stack (64 -> 4 px) with average+max pooling and three heads: shape, colour, style (multi-label)."""

    def __init__(self, widths=(24, 48, 64, 96)):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(4, w), nn.SiLU()]
            if i >= 1:  # a second conv where it is cheap (16 px and below)
                layers += [nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(4, w), nn.SiLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.shape = nn.Linear(2 * c, len(toyworld.SHAPES))
        self.colour = nn.Linear(2 * c, len(COLOUR_NAMES))
        self.style = nn.Linear(2 * c, len(STYLE_NAMES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: N x 3 x H x W in [-1, 1]; returns logits per head."""
        if x.shape[-1] != INPUT or x.shape[-2] != INPUT:
            x = F.interpolate(x, size=(INPUT, INPUT), mode="area")
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {"shape": self.shape(h), "colour": self.colour(h), "style": self.style(h)}


def to_input(images) -> torch.Tensor:
    """PIL images (any size) -> N x 3 x INPUT x INPUT in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((INPUT, INPUT), Image.BOX), dtype=np.float32)
                    for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """N x 3 x H x W in [-1, 1] -> PIL images (the inverse of ``to_input``)."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


# ---------------------------------------------------------------------------------------------- data
def random_styles(rng: random.Random) -> tuple[str, ...]:
    """No style, one style or two styles (a blend), each about equally likely per style."""
    k = rng.choices([0, 1, 2], weights=[0.3, 0.4, 0.3])[0]
    return tuple(sorted(rng.sample(STYLE_NAMES, k)))


def sample(rng: random.Random, *, augment: bool = True, pairs=toyworld.ALL_PAIRS, p_other: float = 0.35):
    """One labelled picture: (image, shape index, colour index, style vector).

    With chance ``p_other`` the picture also has a look of a family none of its styles belongs to, drawn unlike
    that family's style (``toyworld.other_member``) and labelled *not* that style.
    """
    scene = toyworld.sample_scene(rng, pairs, jitter=0.07 if augment else 0.03)
    styles = random_styles(rng)
    look = toyworld.look_of(styles)
    free = [toyworld.STYLE_FAMILIES[s] for s in STYLE_NAMES if s not in styles]
    if free and rng.random() < p_other:
        look = look | toyworld.other_member(rng, rng.choice(free))
    img = toyworld.render(scene, look, INPUT, supersample=1 if augment else 2)
    if augment:
        img = _augment(img, rng)
    target = torch.tensor([float(s in styles) for s in STYLE_NAMES])
    return img, *scene.labels, target


def _augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """Softer, noisier, slightly off-colour copies: how a small diffusion model redraws a picture."""
    if rng.random() < 0.6:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12)  # contrast / brightness
    arr = arr * np.array([rng.uniform(0.93, 1.07) for _ in range(3)], dtype=np.float32)  # colour cast
    arr = arr + np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 8), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def batch(rng: random.Random, n: int, **kw):
    items = [sample(rng, **kw) for _ in range(n)]
    return (to_input([i[0] for i in items]), torch.tensor([i[1] for i in items]), torch.tensor([i[2] for i in items]),
            torch.stack([i[3] for i in items]))


# ---------------------------------------------------------------------------------------------- train / load
def train_classifier(path: str | Path, *, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     log: Callable[[str], None] = print, roundtrip: Callable | None = None,
                     p_roundtrip: float = 0.5) -> ToyClassifier:
    """Train on freshly drawn batches (no picture is seen twice) and save as safetensors; returns the model.

    ``roundtrip`` (N x 3 x H x W in [-1, 1] -> same): the base's VAE encode + decode. A share ``p_roundtrip`` of
    every batch goes through it, so the classifier also reads pictures as the base's decoder draws them (softer
    dots and stripes): a diffusion model's output can be no sharper than its VAE's round trip.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = random.Random(f"classifier:{seed}")
    acc = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, shape, colour, style = batch(rng, batch_size)
        if roundtrip is not None:
            k = int(round(p_roundtrip * len(x)))
            with torch.no_grad():
                x = torch.cat([roundtrip(x[:k]).clamp(-1, 1), x[k:]])
        out = model(x)
        loss = (F.cross_entropy(out["shape"], shape) + F.cross_entropy(out["colour"], colour)
                + F.binary_cross_entropy_with_logits(out["style"], style))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc += loss.item()
        if (step + 1) % 50 == 0:
            log(f"classifier {step + 1}/{steps} loss {acc / 50:.4f}")
            acc = 0.0
    model.eval()
    log(f"classifier: held-out accuracy {evaluate(model, 256, seed=seed + 1)}")
    if roundtrip is not None:
        log(f"classifier: held-out accuracy, VAE round trips {evaluate(model, 256, seed=seed + 2, roundtrip=roundtrip)}")
        log(f"classifier: per style (recall / other members called the style), VAE round trips "
            f"{evaluate_styles(model, 64, seed=seed + 3, roundtrip=roundtrip)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"styles": ",".join(STYLE_NAMES), "colours": ",".join(COLOUR_NAMES),
                        "shapes": ",".join(toyworld.SHAPES)})
    return model


def load_classifier(path: str | Path | None = None) -> ToyClassifier:
    """The committed classifier (or the one at ``path``), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path or CLASSIFIER_WEIGHTS)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run examples/pretrain_tiny_base.py to make it")
    model = ToyClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classify(model: ToyClassifier, images, threshold: float = 0.5) -> list[dict]:
    """Per picture: {"shape", "colour", "styles" (set of names), "style_probs" {name: p}}."""
    out = model(to_input(images))
    probs = torch.sigmoid(out["style"])
    return [{"shape": toyworld.SHAPES[int(out["shape"][i].argmax())], "colour": COLOUR_NAMES[int(out["colour"][i].argmax())],
             "styles": {s for s, p in zip(STYLE_NAMES, probs[i]) if p > threshold},
             "style_probs": {s: float(p) for s, p in zip(STYLE_NAMES, probs[i])}} for i in range(len(images))]


def vae_roundtrip(vae) -> Callable:
    """Encode + decode with ``vae`` (posterior mean), for ``train_classifier``/``evaluate``."""

    @torch.no_grad()
    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.encode(x).latent_dist.mean).sample

    return roundtrip


def through(roundtrip: Callable, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``x`` put through ``roundtrip`` (``vae_roundtrip``) ``chunk`` pictures at a time, clamped to [-1, 1]."""
    return torch.cat([roundtrip(x[i:i + chunk]).clamp(-1, 1) for i in range(0, len(x), chunk)])


@torch.no_grad()
def evaluate(model: ToyClassifier, n: int = 256, seed: int = 1, augment: bool = False,
             roundtrip: Callable | None = None) -> dict[str, float]:
    """Accuracy on ``n`` fresh procedural pictures (optionally through ``roundtrip``, the base's VAE): shape,
    colour, styles (all four labels right), per style."""
    x, shape, colour, style = batch(random.Random(f"classifier-eval:{seed}"), n, augment=augment)
    if roundtrip is not None:
        x = through(roundtrip, x)
    out = model(x)
    pred = torch.sigmoid(out["style"]) > 0.5
    res = {"shape": (out["shape"].argmax(1) == shape).float().mean().item(),
           "colour": (out["colour"].argmax(1) == colour).float().mean().item(),
           "styles": (pred == style.bool()).all(1).float().mean().item()}
    res.update({s: (pred[:, i] == style[:, i].bool()).float().mean().item() for i, s in enumerate(STYLE_NAMES)})
    return {k: round(v, 4) for k, v in res.items()}


@torch.no_grad()
def evaluate_styles(model: ToyClassifier, n: int = 64, seed: int = 1, roundtrip: Callable | None = None
                    ) -> dict[str, dict[str, float]]:
    """Per style, on ``n`` fresh scenes: ``recall`` (drawn in the style, called it) and ``other`` (drawn as another
    member of its family, ``toyworld.other_member``, still called the style: a false alarm)."""
    rng = random.Random(f"classifier-styles:{seed}")
    scenes = [toyworld.sample_scene(rng) for _ in range(n)]
    res = {}
    for style in STYLE_NAMES:
        family = toyworld.STYLE_FAMILIES[style]
        rates = {}
        for kind, looks in (("recall", [toyworld.STYLES[style]] * n),
                            ("other", [toyworld.other_member(rng, family) for _ in range(n)])):
            x = to_input([toyworld.render(s, lk) for s, lk in zip(scenes, looks)])
            if roundtrip is not None:
                x = through(roundtrip, x)
            rates[kind] = round(float((torch.sigmoid(model(x)["style"][:, STYLE_NAMES.index(style)]) > 0.5)
                                      .float().mean()), 4)
        res[style] = rates
    return res
