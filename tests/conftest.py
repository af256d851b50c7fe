"""Shared fixtures: one tiny base per test session (in a temp STYLELORA_HOME), small style image folders."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest

# Set before any stylelora import so every test (and subprocess) shares one tiny base build.
os.environ.setdefault("STYLELORA_HOME", tempfile.mkdtemp(prefix="stylelora-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)


def make_style_images(folder: Path, n: int = 4, *, size=(128, 128), seed: int = 0, captions: bool = True) -> Path:
    """A few diagonal-stripe images (a 'style') with captions, written with PIL."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = size[0] + 64 * (i % 2), size[1]
        img = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for k in range(-h, w, 12):
            draw.line([(k, 0), (k + h, h)], fill=(200, 40, 40), width=3)
        img.save(folder / f"img{i}.png")
        if captions and i % 2 == 0:
            (folder / f"img{i}.txt").write_text(f"{{trigger}}, stripes number {i}", encoding="utf-8")
    return folder


@pytest.fixture
def style_dir(tmp_path) -> Path:
    return make_style_images(tmp_path / "style")


@pytest.fixture(scope="session")
def tiny_base():
    """A freshly loaded tiny base (fp32, CPU). Tests that modify it must load their own."""
    from stylelora.models import load_base

    return load_base("tiny-random")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where torch sees no CUDA device (e.g. CPU-only CI)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in gpu:
        item.add_marker(skip)


def render(pipe):
    """One small fixed picture (2 steps, 64 px, seed 0) as a float array: what parity tests compare."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    return pipe("a lighthouse at dusk", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def ours_and_diffusers(path, base, spec: str = "tiny-random"):
    """``render`` with the adapter file at ``path`` fused by our Blender at weight 1 into ``base`` (given back
    restored), and with the same file loaded by diffusers' own ``load_lora_weights`` into a fresh ``spec`` base."""
    from stylelora.blend import Blender
    from stylelora.models import load_base

    blender = Blender(base)
    blender.load(path, weight=1.0)
    ours = render(base.pipe)
    blender.reset()
    theirs = load_base(spec).pipe
    theirs.load_lora_weights(str(path))
    return ours, render(theirs)
