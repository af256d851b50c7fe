"""Training data: folder scan, captions, image decoding, aspect-ratio buckets and batch plans.

Caption rules (kohya-compatible, which is what style-LoRA users expect):
- A same-stem ``.txt`` (then ``.caption``) file next to an image is its caption; newlines become ", ".
- ``{trigger}`` in a caption is replaced by the trigger word.
- With a trigger, a caption that mentions neither the trigger nor ``{trigger}`` gets "trigger, " prepended,
  so every image teaches the style under the same word.
- An image without a caption (or with an empty one) gets ``caption_template.format(trigger=...)``.
Repeats: a folder named ``N_name`` gives the images in and below it N repeats per epoch. An explicit
``repeats`` mapping (folder relative path, or folder name; "." is the root) overrides a folder's prefix.
The nearest folder with a count wins, then ``default_repeats``.
"""
from __future__ import annotations

import codecs
import contextlib
import contextvars
import hashlib
import math
import os
import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from stylelora.errors import ConfigError, DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")

_SUPPORTED = ", ".join(e.lstrip(".") for e in IMAGE_EXTS)
_KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 mean the image is stored rotated by 90 degrees
_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: same prefix
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"), (codecs.BOM_UTF8, "utf-8-sig")]


@dataclass(frozen=True)
class ImageItem:
    """One training image with its final caption and sampling weight."""

    path: Path
    caption: str
    repeats: int
    subset: str
    width: int
    height: int


@dataclass(frozen=True)
class Bucket:
    """A training resolution (both sides multiples of the bucket step)."""

    width: int
    height: int


# ----------------------------------------------------------------------------------------------- images


@contextlib.contextmanager
def _strict_truncation():
    """Temporarily make PIL raise on truncated files instead of padding them with grey."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


_SKIP_HINT = ". Fix or remove the file, or pass --skip-bad-images"


def _bad_image(path: Path, reason: str) -> DataError:
    return DataError(f"cannot read image {path}: {reason}{_SKIP_HINT}")


def _check_pixels(path: Path, img: Image.Image) -> None:
    """Refuse an image over PIL's pixel limit from its header, before any pixel is decoded.

    PIL itself refuses only above twice ``Image.MAX_IMAGE_PIXELS`` and merely warns between the two, then decodes
    (a 150-megapixel image takes seconds to decode and hundreds of MB, then is trained on at a fraction of its
    size). The limit is PIL's own setting, so a user who raised it for big scans gets what they asked for.
    """
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit and w * h > limit:
        raise _bad_image(path, f"it is {w}x{h} = {w * h} pixels, more than the limit of {limit} "
                               "(PIL.Image.MAX_IMAGE_PIXELS); downscale it (training uses at most the "
                               "resolution's area anyway)")


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image; verify() alone misses truncated pixel data."""
    try:
        if path.stat().st_size == 0:
            raise _bad_image(path, "the file is empty (0 bytes)")
        with _strict_truncation(), warnings.catch_warnings():
            # over the limit is refused just below, so PIL's "could be decompression bomb" warning adds nothing
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(path, img)
                img.load()
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise _bad_image(path, str(e) or type(e).__name__) from e
    return img


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as exif_transpose would return them, without copying pixels."""
    w, h = img.size
    return (h, w) if img.getexif().get(_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to 8-bit by range, never by clipping."""
    arr = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        arr = arr * (255.0 / 65535.0)  # 'I' from a PNG/TIFF almost always holds 16-bit samples
    elif img.mode == "F" and lo >= 0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo < 0 or hi > 255:
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over white (what viewers show)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _gray_to_8bit(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr: PIL's conversions are correct here


def load_image(path) -> Image.Image:
    """Decode an image file to an upright RGB PIL image."""
    path = Path(path)
    img = _open_image(path)
    try:
        return _to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:
        raise _bad_image(path, f"cannot convert mode {img.mode} to RGB ({e})") from e


# --------------------------------------------------------------------------------------------- captions


def _decode_caption(data: bytes, path: Path) -> str:
    """Decode caption bytes: BOM-marked UTF-8/16/32, then UTF-8, cp1252, latin-1 (never fails)."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError as e:
                raise DataError(f"caption file {path} starts with a {enc} marker but is not valid {enc} "
                                f"({e.reason}). Re-save it as UTF-8.") from e
    # BOM-less UTF-16 (every other byte zero) would otherwise "decode" as UTF-8 full of NULs.
    if len(data) >= 2 and len(data) % 2 == 0 and data.count(0) * 2 >= len(data) * 0.9:
        enc = "utf-16-le" if data[1::2].count(0) > data[0::2].count(0) else "utf-16-be"
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode(enc)
    for enc in ("utf-8", "cp1252"):
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode(enc)
    return data.decode("latin-1")


def _read_caption(path: Path) -> str:
    """Read a caption file as one line: lines joined by ', ', whitespace collapsed."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read caption file {path}: {e.strerror or e}. Check its permissions.") from e
    lines = (" ".join(line.split()).strip(" ,") for line in _decode_caption(data, path).splitlines())
    return ", ".join(line for line in lines if line)


def _mentions(caption: str, trigger: str) -> bool:
    """True if the trigger appears as a whole word (case-insensitive, as CLIP lowercases anyway)."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE) is not None


def _template_fields(template: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:
        raise ConfigError(f"caption template {template!r} is invalid ({e}). Use e.g. '{{trigger}}, painting'.") from e


# ----------------------------------------------------------------------------------------------- scan


# The folders a scan may read from; None: wherever the folder's links lead. A command-line user owns the folder
# they pass and its links (linked-in subsets are a common way to share images between datasets), so the CLI
# follows links anywhere. The web UI serves people who do not own the server: it confines every scan (its own
# check and the one inside train(), via ``confined_to``) to its --train-root folders or its upload folder, so a
# link placed in a training root cannot pull an outside file's text into an adapter's metadata.
_ROOTS: contextvars.ContextVar[tuple[Path, ...] | None] = contextvars.ContextVar("stylelora_scan_roots",
                                                                                   default=None)


@contextlib.contextmanager
def confined_to(roots):
    """Within this block (this thread or task), every ``scan_folder`` without ``roots`` uses these roots."""
    token = _ROOTS.set(tuple(Path(r).resolve() for r in roots))
    try:
        yield
    finally:
        _ROOTS.reset(token)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in roots)


def _outside_error(path: Path, what: str, roots: tuple[Path, ...]) -> DataError:
    # the link's target is not named: it is exactly what must not reach the person who asked
    return DataError(f"{what} {path} is a link to a place outside the allowed folders "
                     f"({', '.join(str(r) for r in roots)}); links out of them are not followed here. Copy the "
                     f"file into the folder, or remove the link.")


def _walk(root: Path, roots: tuple[Path, ...] | None = None) -> list[tuple[str, Path]]:
    """All non-hidden files under root as (relative posix path, absolute path), sorted by relative path.
    With ``roots``, a folder (or the root itself) that resolves outside them is refused."""
    found, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if roots is not None and not _inside(Path(dirpath), roots):
            raise _outside_error(Path(dirpath), "folder", roots)
        if real in seen_dirs:  # a symlink loop: following links is for linked-in subsets, not cycles
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _repeats_for(subset: str, overrides: dict[str, int], default: int, used: set[str]) -> int:
    """Nearest folder with a count wins; at one folder an explicit override beats its 'N_name' prefix."""
    here = PurePosixPath(subset)
    chain = [] if subset == "." else [here, *(p for p in here.parents if str(p) != ".")]
    for folder in chain + [PurePosixPath(".")]:
        for key in (str(folder), folder.name):
            if key in overrides:
                used.add(key)
                return overrides[key]
        m = _KOHYA_DIR.match(folder.name)
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
    return default


def _no_images_error(root: Path, files: list[tuple[str, Path]], skipped: int) -> DataError:
    exts = Counter(p.suffix.lower() or "(no extension)" for _, p in files)
    found = ", ".join(f"{n} {e}" for e, n in sorted(exts.items())) or "nothing"
    extra = f" ({skipped} unreadable images were skipped)" if skipped else ""
    return DataError(f"no usable images in {root}: found {found}{extra}. Supported: {_SUPPORTED}. "
                     f"Add images to the folder or point to the right one.")


def scan_folder(root, *, trigger: str | None = None, caption_template: str = "{trigger}",
                caption_exts=CAPTION_EXTS, repeats: dict[str, int] | None = None,
                default_repeats: int = 1, skip_bad_images: bool = False, roots=None,
                report: dict | None = None) -> list[ImageItem]:
    """Find, validate and caption every image under root (recursively, sorted by relative path).

    ``roots``: folders every image and caption must resolve inside (links out of them are refused, naming the
    link); None takes them from an enclosing ``confined_to`` block, else links are followed anywhere.
    ``report``: a dict that gets ``uncaptioned`` (images captioned from the template, i.e. the trigger) and
    ``skipped`` ((path relative to root, reason) of each skipped image) lists, for ``summarize``.
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist. Check the path.")
    if not root.is_dir():
        raise DataError(f"dataset path {root} is a file, not a folder. Pass the folder that holds the images.")
    fields = _template_fields(caption_template)
    if fields - {"trigger"}:
        raise ConfigError(f"caption template {caption_template!r} uses unknown fields {sorted(fields - {'trigger'})}; "
                          f"only {{trigger}} is available.")
    overrides = {PurePosixPath(k.strip("/") or ".").as_posix(): v for k, v in (repeats or {}).items()}
    for key, n in list(overrides.items()) + [("default", default_repeats)]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"repeats for {key!r} must be a positive integer, got {n!r}.")
    trigger = trigger.strip() if trigger else None
    exts = tuple("." + e.lower().lstrip(".") for e in caption_exts)

    roots = tuple(Path(r).resolve() for r in roots) if roots is not None else _ROOTS.get()
    files = _walk(root, roots)
    if roots is not None:
        for _, path in files:
            if path.suffix.lower() in IMAGE_EXTS + exts and not _inside(path, roots):
                raise _outside_error(path, "caption file" if path.suffix.lower() in exts else "image", roots)
    captions: dict[tuple[str, str], dict[str, Path]] = {}
    for rel, path in files:
        if path.suffix.lower() in exts:
            captions.setdefault((str(PurePosixPath(rel).parent), path.stem), {})[path.suffix.lower()] = path

    items, bad, no_caption, used, skipped, uncaptioned = [], [], [], set(), [], []
    for rel, path in files:
        if path.suffix.lower() not in IMAGE_EXTS:
            continue
        try:
            width, height = _oriented_size(_open_image(path))
        except DataError as e:
            if not skip_bad_images:
                raise
            bad.append(str(e).removesuffix(_SKIP_HINT))  # it was passed: the list says what was skipped, and why
            # the reason without the folder's path (PIL's own messages repeat it): the UI must not show it
            skipped.append((rel, bad[-1].split(f"{path}: ", 1)[-1].replace(str(path), rel)))
            continue
        subset = str(PurePosixPath(rel).parent)
        found = captions.get((subset, path.stem), {})
        cap_path = next((found[e] for e in exts if e in found), None)
        caption = _read_caption(cap_path) if cap_path else ""
        if caption and "{trigger}" in caption:
            if not trigger:
                raise DataError(f"caption file {cap_path} contains {{trigger}} but no --trigger was given. "
                                f"Pass --trigger WORD or remove {{trigger}} from the caption.")
            caption = caption.replace("{trigger}", trigger)
        elif caption and trigger and not _mentions(caption, trigger):
            caption = f"{trigger}, {caption}"
        elif not caption:
            if "trigger" in fields and not trigger:
                no_caption.append(path)
                continue
            caption = caption_template.format(trigger=trigger)
            uncaptioned.append(path)
        reps = _repeats_for(subset, overrides, default_repeats, used)
        items.append(ImageItem(path, caption, reps, subset, width, height))

    if report is not None:
        report.setdefault("uncaptioned", []).extend(uncaptioned)
        report.setdefault("skipped", []).extend(skipped)
    if no_caption:
        more = f" (and {len(no_caption) - 1} more)" if len(no_caption) > 1 else ""
        raise DataError(f"image {no_caption[0]}{more} has no caption and no --trigger was given. Pass --trigger "
                        f"WORD, add a same-stem .txt caption, or set a caption template without {{trigger}}.")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s):\n  " + "\n  ".join(bad), stacklevel=2)
    if not items:
        raise _no_images_error(root, files, len(bad))
    unused = sorted(set(overrides) - used)
    if unused:
        warnings.warn(f"repeats given for {unused} but no images in {root} are in such a folder; "
                      f"check the folder names.", stacklevel=2)
    return items


# --------------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class DatasetSummary:
    """What a run will train on, shown before training starts (CLI) and in the web UI's status."""

    images: int                        # style images (regularization images not included)
    captioned: int                     # style images with a caption file
    uncaptioned: int                   # style images captioned from the template (the trigger word)
    reg_images: int                    # regularization images
    repeats: dict[int, int]            # {repeats: how many images have it}
    samples_per_epoch: int             # sum of the repeats
    buckets: dict[tuple[int, int], int]  # {(width, height): images}
    upscaled: int                      # images enlarged to fill their bucket
    downscaled: int                    # images shrunk to fit their bucket
    skipped: tuple[tuple[str, str], ...] = ()  # (file, reason), file relative to its dataset folder

    def format(self) -> str:
        trig = f"; {self.uncaptioned} without one, captioned with the trigger" if self.uncaptioned else ""
        lines = [f"dataset: {self.images} image(s), {self.captioned} with a caption file{trig}"
                 + (f"; {self.reg_images} regularization image(s)" if self.reg_images else "")]
        reps = ", ".join(f"{n} image(s) x {r}" for r, n in sorted(self.repeats.items()))
        lines.append(f"  repeats: {reps} = {self.samples_per_epoch} samples per epoch")
        lines.append("  buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items())))
        kept = self.images + self.reg_images - self.upscaled - self.downscaled
        lines.append(f"  resized: {self.upscaled} upscaled, {self.downscaled} downscaled, {kept} at their size")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} file(s):")
            lines += [f"    {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def summarize(items: list[ImageItem], *, resolution: int, bucket_step: int = 64, upscale: bool = False,
              uncaptioned=(), skipped=()) -> DatasetSummary:
    """The summary of scanned ``items`` (style and ``reg/`` subsets) as training will bucket them.

    ``uncaptioned`` and ``skipped`` are ``scan_folder``'s ``report`` lists. The buckets are the ones
    ``assign_bucket`` gives (what TrainingSet uses); an image is up- or downscaled when ``prepare_pixels`` has to
    scale it to cover its bucket.
    """
    style = [it for it in items if not it.subset.startswith("reg/")]
    no_caption = {Path(p) for p in uncaptioned}
    buckets: Counter = Counter()
    up = down = 0
    for it in items:
        b = assign_bucket(it.width, it.height, resolution, no_upscale=not upscale, step=bucket_step)
        buckets[(b.width, b.height)] += 1
        scale = max(b.width / it.width, b.height / it.height)
        up, down = up + (scale > 1), down + (scale < 1)
    uncap = sum(it.path in no_caption for it in style)
    return DatasetSummary(
        images=len(style), captioned=len(style) - uncap, uncaptioned=uncap, reg_images=len(items) - len(style),
        repeats=dict(Counter(it.repeats for it in items)), samples_per_epoch=sum(it.repeats for it in items),
        buckets=dict(buckets), upscaled=up, downscaled=down, skipped=tuple(skipped))


# --------------------------------------------------------------------------------------------- buckets


def make_buckets(resolution: int, *, step: int = 64, min_side: int = 64, max_side: int | None = None,
                 max_aspect: float = 4.0) -> list[Bucket]:
    """All step-aligned (w, h) with w*h <= resolution², aspect within max_aspect, h maximal for each w."""
    if step < 1 or resolution < step or resolution % step:
        raise ConfigError(f"resolution {resolution} must be a positive multiple of {step} (e.g. 512, 768, 1024).")
    area = resolution * resolution
    lo = max(step, -(-min_side // step) * step)
    hi = area // lo if max_side is None else max_side
    buckets = {Bucket(resolution, resolution)} if max_side is None or max_side >= resolution else set()
    for w in range(lo, hi + 1, step):
        h = (area // w) // step * step
        if max_side is not None:
            h = min(h, max_side // step * step)
        if h >= lo and max(w / h, h / w) <= max_aspect:
            buckets.add(Bucket(w, h))
    return sorted(buckets, key=lambda b: (b.width, b.height))


def assign_bucket(width: int, height: int, resolution: int, *, buckets: list[Bucket] | None = None,
                  no_upscale: bool = True, step: int = 64) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's (never upscaling small images if asked)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    buckets = buckets or make_buckets(resolution, step=step)
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - ratio), -b.width * b.height, b.width))
    if no_upscale and width * height < best.width * best.height:
        # Train small images at (about) their own size rather than blowing them up into blur.
        scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
        w = max(step, int(width * scale) // step * step)
        h = max(step, int(height * scale) // step * step)
        if w * h > resolution * resolution:  # the one-step minimum on a thin image's short side
            if w >= h:
                w = max(step, resolution * resolution // h // step * step)
            else:
                h = max(step, resolution * resolution // w // step * step)
        return Bucket(w, h)
    return best


def prepare_pixels(img, bucket: Bucket, *, crop: str = "center", flip: bool = False,
                   rng: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize to cover the bucket, crop, optionally flip; returns ([3,H,W] in [-1,1], (top, left), (h, w))."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    img = _to_rgb(img)
    w, h = img.size
    bw, bh = bucket.width, bucket.height
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((rw, rh), resample)
    if crop == "center":
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top = int(torch.randint(0, rh - bh + 1, (1,), generator=rng))
        left = int(torch.randint(0, rw - bw + 1, (1,), generator=rng))
    img = img.crop((left, top, left + bw, top + bh))
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
    if flip:
        pixels = pixels.flip(-1)
        left = rw - bw - left  # report the crop as seen in the flipped image (SDXL crop conditioning)
    return pixels.contiguous(), (top, left), (h, w)


# --------------------------------------------------------------------------------------------- batching


def _generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from (seed, epoch) by hashing, so nearby seeds/epochs give unrelated orders."""
    digest = hashlib.sha256(f"stylelora:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def batch_plan(buckets: list[Bucket], repeats: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches (item indices); every batch holds a single bucket, order fixed by (seed, epoch)."""
    if len(buckets) != len(repeats):
        raise ValueError(f"got {len(buckets)} buckets but {len(repeats)} repeat counts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Bucket, list[int]] = {}
    for i, (bucket, n) in enumerate(zip(buckets, repeats)):
        if n < 0:
            raise ValueError(f"repeats[{i}] is negative ({n})")
        groups.setdefault(bucket, []).extend([i] * n)
    g = _generator(seed, epoch)
    batches = []
    for bucket in sorted(groups, key=lambda b: (b.width, b.height)):  # fixed order: the plan is reproducible
        idx = groups[bucket]
        shuffled = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        batches += [shuffled[k:k + batch_size] for k in range(0, len(shuffled), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
