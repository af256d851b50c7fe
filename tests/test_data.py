"""Tests for stylelora.data: scanning, captions, image decoding, buckets, pixels and batch plans."""
import codecs
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from stylelora.data import (
    Bucket, ImageItem, assign_bucket, batch_plan, load_image, make_buckets, prepare_pixels, scan_folder,
)
from stylelora.errors import ConfigError, DataError, StyleloraError


def img(path: Path, size=(32, 24), color=(200, 10, 10), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def noise(path: Path, size=(256, 256), seed=0, **save) -> Path:
    """A noisy image: large enough on disk that cutting it in half truncates pixel data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, **save)
    return path


def text(path: Path, content, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


def by_name(items):
    return {it.path.name: it for it in items}


# ------------------------------------------------------------------------------------------------ scan


def test_scan_recursive_sorted_hidden_and_case(tmp_path):
    for rel in ["b.png", "a.png", "A.JPG", "sub/c.PNG", "sub/deeper/d.JpEg", "e.webp", "f.bmp"]:
        img(tmp_path / rel, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(rel.rsplit(".", 1)[1].lower()))
    img(tmp_path / ".hidden" / "x.png")
    img(tmp_path / "sub" / ".y.png")
    text(tmp_path / "notes.md", "# not an image")
    text(tmp_path / "sub" / "readme.txt", "no image with this stem")

    items = scan_folder(tmp_path, trigger="sks")
    rels = [it.path.relative_to(tmp_path).as_posix() for it in items]
    assert rels == sorted(["A.JPG", "a.png", "b.png", "e.webp", "f.bmp", "sub/c.PNG", "sub/deeper/d.JpEg"])
    assert all(it.path.is_absolute() for it in items)
    assert by_name(items)["c.PNG"].subset == "sub"
    assert by_name(items)["d.JpEg"].subset == "sub/deeper"
    assert by_name(items)["a.png"].subset == "."
    assert (by_name(items)["a.png"].width, by_name(items)["a.png"].height) == (32, 24)
    assert scan_folder(tmp_path, trigger="sks") == items  # deterministic


def test_captions_txt_caption_trigger_and_template(tmp_path):
    img(tmp_path / "a.png"); text(tmp_path / "a.txt", "  a tree,\n\n a river  \r\n")
    img(tmp_path / "b.png"); text(tmp_path / "b.caption", "{trigger} style, a boat")
    img(tmp_path / "c.png")  # no caption -> template
    img(tmp_path / "d.png"); text(tmp_path / "d.txt", "from txt"); text(tmp_path / "d.caption", "from caption")
    img(tmp_path / "e.png"); text(tmp_path / "e.txt", "a SKS painting of a cat")
    img(tmp_path / "f.png"); text(tmp_path / "f.txt", "   \n")  # empty caption -> template

    caps = {n: it.caption for n, it in by_name(scan_folder(tmp_path, trigger="sks")).items()}
    assert caps == {
        "a.png": "sks, a tree, a river",  # trigger prepended, newlines collapsed
        "b.png": "sks style, a boat",
        "c.png": "sks",
        "d.png": "sks, from txt",  # .txt wins over .caption
        "e.png": "a SKS painting of a cat",  # already mentions the trigger
        "f.png": "sks",
    }
    caps = {n: it.caption for n, it in
            by_name(scan_folder(tmp_path, trigger="sks", caption_template="a painting in {trigger} style")).items()}
    assert caps["c.png"] == "a painting in sks style"
    # Only .caption files considered when asked.
    caps = by_name(scan_folder(tmp_path, trigger="sks", caption_exts=("caption",)))
    assert caps["d.png"].caption == "sks, from caption" and caps["a.png"].caption == "sks"


def test_missing_trigger_errors(tmp_path):
    img(tmp_path / "a.png"); text(tmp_path / "a.txt", "a tree")
    img(tmp_path / "nocap.png")
    with pytest.raises(DataError, match=r"nocap\.png.*no caption.*--trigger"):
        scan_folder(tmp_path)
    # A template that does not need a trigger is fine; captions are kept as written.
    caps = by_name(scan_folder(tmp_path, caption_template="a painting"))
    assert caps["nocap.png"].caption == "a painting" and caps["a.png"].caption == "a tree"

    text(tmp_path / "nocap.txt", "{trigger}, a house")
    with pytest.raises(DataError, match=r"nocap\.txt.*\{trigger\}.*--trigger") as e:
        scan_folder(tmp_path)
    assert str(tmp_path / "nocap.txt") in str(e.value)
    assert issubclass(DataError, StyleloraError)
    with pytest.raises(ConfigError):
        scan_folder(tmp_path, trigger="x", caption_template="{subject}")


def test_caption_encodings(tmp_path):
    cases = {
        "bom8": codecs.BOM_UTF8 + "café, naïve".encode("utf-8"),
        "utf8": "ünïcode ☕".encode("utf-8"),
        "utf16": "Grüße, ß".encode("utf-16"),  # with BOM
        "utf16be": codecs.BOM_UTF16_BE + "Grüße".encode("utf-16-be"),
        "utf16nobom": "plain words".encode("utf-16-le"),
        "latin1": "déjà vu, señor".encode("latin-1"),
        "cp1252": "“quoted” – dash".encode("cp1252"),
    }
    for stem, data in cases.items():
        img(tmp_path / f"{stem}.png"); text(tmp_path / f"{stem}.txt", data)
    caps = {n[:-4]: it.caption for n, it in by_name(scan_folder(tmp_path, caption_template="x")).items()}
    assert caps == {"bom8": "café, naïve", "utf8": "ünïcode ☕", "utf16": "Grüße, ß", "utf16be": "Grüße",
                    "utf16nobom": "plain words", "latin1": "déjà vu, señor", "cp1252": "“quoted” – dash"}


def test_repeats_kohya_folders_and_overrides(tmp_path):
    img(tmp_path / "root.png")
    img(tmp_path / "10_style" / "a.png")
    img(tmp_path / "10_style" / "2_inner" / "b.png")
    img(tmp_path / "10_style" / "plain" / "c.png")
    img(tmp_path / "0_zero" / "d.png")  # 0 is not a valid repeat count -> default
    img(tmp_path / "style_5" / "e.png")  # wrong pattern -> default

    reps = {n: it.repeats for n, it in by_name(scan_folder(tmp_path, trigger="t", default_repeats=3)).items()}
    assert reps == {"root.png": 3, "a.png": 10, "b.png": 2, "c.png": 10, "d.png": 3, "e.png": 3}

    items = scan_folder(tmp_path, trigger="t", repeats={"10_style": 4, "10_style/plain": 7, "style_5": 6})
    reps = {n: it.repeats for n, it in by_name(items).items()}
    assert reps == {"root.png": 1, "a.png": 4, "b.png": 2, "c.png": 7, "d.png": 1, "e.png": 6}
    # A name that matches no folder is reported instead of silently ignored.
    with pytest.warns(UserWarning, match="nope"):
        scan_folder(tmp_path, trigger="t", repeats={"nope": 2})
    with pytest.raises(ConfigError):
        scan_folder(tmp_path, trigger="t", repeats={"10_style": 0})


# ------------------------------------------------------------------------------------------ bad inputs


def _truncated_png(path):
    noise(path, format="PNG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _truncated_jpeg(path):
    noise(path, format="JPEG", quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


BAD = {
    "trunc.png": _truncated_png,
    "trunc.jpg": _truncated_jpeg,
    "empty.png": lambda p: text(p, b""),
    "text.png": lambda p: text(p, "this is not a png"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_image_names_file(tmp_path, name, monkeypatch):
    img(tmp_path / "good.png")
    bad = BAD[name](tmp_path / name)
    # Must fail even if some other library switched PIL to "pad truncated images with grey".
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="--skip-bad-images") as e:
        scan_folder(tmp_path, trigger="t")
    assert str(bad) in str(e.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # global setting restored
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        load_image(bad)


def test_skip_bad_images_warns_with_all_names(tmp_path):
    img(tmp_path / "good1.png")
    img(tmp_path / "sub" / "good2.jpg", format="JPEG")
    for name, make in BAD.items():
        make(tmp_path / "sub" / name)
    with pytest.warns(UserWarning) as record:
        items = scan_folder(tmp_path, trigger="t", skip_bad_images=True)
    assert [it.path.name for it in items] == ["good1.png", "good2.jpg"]
    message = "\n".join(str(w.message) for w in record)
    assert "skipped 4" in message
    for name in BAD:
        assert str(tmp_path / "sub" / name) in message


def test_skip_bad_images_all_bad(tmp_path):
    text(tmp_path / "x.png", b"")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable images.*skipped"):
        scan_folder(tmp_path, trigger="t", skip_bad_images=True)


def test_empty_and_nonimage_folders_and_bad_roots(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no usable images in .*empty.*Supported: jpg"):
        scan_folder(tmp_path / "empty", trigger="t")
    text(tmp_path / "docs" / "notes.md", "hi")
    text(tmp_path / "docs" / "a.txt", "caption without image")
    img(tmp_path / "docs" / "anim.gif", format="GIF")
    with pytest.raises(DataError, match=r"no usable images.*found .*\.gif.*\.md.*Supported"):
        scan_folder(tmp_path / "docs", trigger="t")
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing", trigger="t")
    with pytest.raises(DataError, match="not a folder"):
        scan_folder(img(tmp_path / "file.png"), trigger="t")


# ----------------------------------------------------------------------------------------- load_image


def test_exif_rotated_jpeg(tmp_path):
    # Stored 60x40 with a red top half and a blue bottom half; orientation 6 = rotate 90 degrees clockwise.
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:20] = (255, 0, 0)
    arr[20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)

    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 60)
    r, g, b = out.getpixel((35, 30))  # the stored top is now on the right
    assert r > 200 and b < 60
    r, g, b = out.getpixel((4, 30))
    assert b > 200 and r < 60
    (item,) = scan_folder(tmp_path, trigger="t")
    assert (item.width, item.height) == (40, 60)


def test_load_image_modes(tmp_path):
    gray = load_image(img(tmp_path / "gray.png", color=100, mode="L"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (100, 100, 100)

    cmyk = load_image(img(tmp_path / "cmyk.jpg", color=(0, 255, 255, 0), mode="CMYK", quality=95))
    r, g, b = cmyk.getpixel((5, 5))
    assert cmyk.mode == "RGB" and r > 230 and g < 30 and b < 30

    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert out.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))

    la = Image.new("LA", (2, 1), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL "palette with transparency" warning either
        out = load_image(tmp_path / "pal.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)


def test_16bit_png_scales_not_clips(tmp_path):
    arr = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I;16")
    out = load_image(tmp_path / "g16.png")
    px = [out.getpixel((x, 0)) for x in range(4)]
    assert px[0] == (255, 255, 255)
    assert all(abs(c - 128) <= 1 for c in px[1])
    assert px[2] == (0, 0, 0) and px[3] == (1, 1, 1)
    # 32-bit 'I' images holding 16-bit samples (older Pillow's 16-bit PNGs) scale the same way.
    i32 = Image.fromarray(np.array([[65535, 0]], dtype=np.int32), "I")
    pixels, _, _ = prepare_pixels(i32, Bucket(64, 64))
    assert pixels[:, :, 0].min() > 0.99 and pixels[:, :, -1].max() < -0.99


# -------------------------------------------------------------------------------------------- buckets


@pytest.mark.parametrize("res", [256, 512, 768, 1024])
def test_make_buckets_limits(res):
    buckets = make_buckets(res)
    assert Bucket(res, res) in buckets
    assert buckets == sorted(set(buckets), key=lambda b: (b.width, b.height)) == make_buckets(res)
    for b in buckets:
        assert b.width * b.height <= res * res
        assert b.width % 64 == 0 and b.height % 64 == 0 and min(b.width, b.height) >= 64
        assert max(b.width / b.height, b.height / b.width) <= 4.0
        # h is the largest step multiple that fits for this w
        assert b.width * (b.height + 64) > res * res or b.width == b.height == res
    assert len(buckets) > 5
    assert {(b.width, b.height) for b in make_buckets(res, max_aspect=1.5)} <= {
        (b.width, b.height) for b in buckets}
    with pytest.raises(ConfigError):
        make_buckets(500)


def test_assign_bucket_random_sizes_stay_in_limits():
    rnd = random.Random(0)
    for res in (512, 1024):
        buckets = make_buckets(res)
        for _ in range(300):
            w, h = rnd.randint(16, 5000), rnd.randint(16, 5000)
            for no_upscale in (True, False):
                b = assign_bucket(w, h, res, buckets=buckets, no_upscale=no_upscale)
                assert b.width * b.height <= res * res
                assert b.width % 64 == 0 and b.height % 64 == 0 and b.width >= 64 and b.height >= 64
                if no_upscale:
                    assert b.width * b.height <= max(w, 64) * max(h, 64)
                else:
                    assert b in buckets
            if w * h >= res * res * 1.1:  # big images: nearest aspect wins
                b = assign_bucket(w, h, res, buckets=buckets)
                best = min(abs(np.log(c.width / c.height) - np.log(w / h)) for c in buckets)
                assert abs(np.log(b.width / b.height) - np.log(w / h)) == pytest.approx(best)


def test_assign_bucket_examples():
    small = assign_bucket(100, 70, 512)
    assert small.width <= 100 and small.height <= 70 and small == Bucket(64, 64)
    assert assign_bucket(300, 200, 512) == Bucket(256, 192)
    wide = assign_bucket(2000, 1000, 512)
    assert 1.8 <= wide.width / wide.height <= 2.4 and wide.width * wide.height <= 512 * 512
    tall = assign_bucket(1000, 2000, 512)
    assert 1.8 <= tall.height / tall.width <= 2.4
    assert assign_bucket(1000, 1000, 512) == Bucket(512, 512)
    assert assign_bucket(100, 70, 512, no_upscale=False).width > 100  # upscaling allowed when asked
    thin = assign_bucket(5000, 20, 512)  # one-step minimum height must not push the area over the limit
    assert thin.height == 64 and thin.width * thin.height <= 512 * 512 and thin.width % 64 == 0


# ------------------------------------------------------------------------------------------ pixels


def test_prepare_pixels_shapes_range_flip_and_crop(tmp_path):
    image = load_image(noise(tmp_path / "n.png", size=(300, 200)))
    bucket = Bucket(192, 192)
    pixels, crop, orig = prepare_pixels(image, bucket)
    assert pixels.shape == (3, 192, 192) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.min() < -0.9 and pixels.max() > 0.9
    assert orig == (200, 300)
    assert crop == (0, (288 - 192) // 2)  # resized to 288x192, centered horizontally

    flipped, fcrop, _ = prepare_pixels(image, bucket, flip=True)
    assert torch.equal(flipped, pixels.flip(-1))
    assert fcrop == crop  # a centered crop is symmetric

    a = prepare_pixels(image, bucket, crop="random", rng=torch.Generator().manual_seed(3))
    b = prepare_pixels(image, bucket, crop="random", rng=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    crops = {prepare_pixels(image, bucket, crop="random", rng=torch.Generator().manual_seed(s))[1]
             for s in range(20)}
    assert len(crops) > 1 and all(t == 0 and 0 <= left <= 96 for t, left in crops)
    # A flipped random crop reports its left edge as seen in the flipped image.
    plain = prepare_pixels(image, bucket, crop="random", rng=torch.Generator().manual_seed(5))
    mirror = prepare_pixels(image, bucket, crop="random", flip=True, rng=torch.Generator().manual_seed(5))
    assert torch.equal(mirror[0], plain[0].flip(-1)) and mirror[1] == (plain[1][0], 96 - plain[1][1])

    white, _, _ = prepare_pixels(Image.new("RGB", (70, 50), "white"), Bucket(64, 64))
    black, _, _ = prepare_pixels(Image.new("RGB", (50, 90), "black"), Bucket(64, 128))
    assert white.shape == (3, 64, 64) and torch.all(white == 1.0)
    assert black.shape == (3, 128, 64) and torch.all(black == -1.0)
    with pytest.raises(ValueError):
        prepare_pixels(image, bucket, crop="top")


# ----------------------------------------------------------------------------------------- batching


def test_batch_plan():
    kinds = [Bucket(512, 512), Bucket(640, 384), Bucket(384, 640)]
    buckets = [kinds[i % 3] for i in range(11)]
    repeats = [1, 2, 3, 1, 0, 5, 1, 1, 2, 4, 1]
    plan = batch_plan(buckets, repeats, 3, seed=42, epoch=0)
    assert plan == batch_plan(buckets, repeats, 3, seed=42, epoch=0)
    assert Counter(i for batch in plan for i in batch) == Counter(
        {i: n for i, n in enumerate(repeats) if n})
    for batch in plan:
        assert 1 <= len(batch) <= 3 and len({buckets[i] for i in batch}) == 1
    # Only the last batch of each bucket may be partial.
    for kind in kinds:
        sizes = [len(b) for b in plan if buckets[b[0]] == kind]
        assert sum(s < 3 for s in sizes) <= 1
    assert plan != batch_plan(buckets, repeats, 3, seed=42, epoch=1)
    assert plan != batch_plan(buckets, repeats, 3, seed=43, epoch=0)
    assert batch_plan(buckets, [0] * 11, 2, seed=0, epoch=0) == []


def test_tag_frequency():
    from stylelora.formats.metadata import tag_frequency

    items = [
        ImageItem(Path("/a.png"), "sks, tree, river", 10, "10_style", 64, 64),
        ImageItem(Path("/b.png"), "sks, tree , tree", 10, "10_style", 64, 64),
        ImageItem(Path("/c.png"), "sks", 1, ".", 64, 64),
    ]
    # kohya keys ss_tag_frequency by folder: the image folder itself (subset ".") by its own name
    assert tag_frequency(items, "/data/imgs") == {"10_style": {"sks": 2, "tree": 2, "river": 1}, "imgs": {"sks": 1}}


# ------------------------------------------------------------------------------- hostile files (issue 22)


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's first bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_png_declaring_a_huge_size_is_refused_before_decoding(tmp_path):
    import time

    img(tmp_path / "good.png")
    _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels = 30 GB of RGB
    start = time.perf_counter()
    with pytest.raises(DataError, match="bomb.png") as e:
        scan_folder(tmp_path, trigger="t")
    assert time.perf_counter() - start < 5  # refused from the header, not after decoding
    assert "10000000000" in str(e.value).replace(",", "") or "100000x100000" in str(e.value)
    with pytest.warns(UserWarning, match="bomb.png"):
        assert [it.path.name for it in scan_folder(tmp_path, trigger="t", skip_bad_images=True)] == ["good.png"]


def test_images_over_the_pixel_limit_are_refused_not_just_warned_about(tmp_path, monkeypatch):
    # PIL only warns between MAX_IMAGE_PIXELS and twice that, then decodes (minutes for a real 150 MP scan);
    # a small limit here stands for the real one so the test writes a few KB.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    img(tmp_path / "small.png", size=(64, 64))
    big = img(tmp_path / "big.png", size=(80, 80))  # 6400 px: over the limit, under twice it
    with pytest.raises(DataError, match="big.png") as e:
        scan_folder(tmp_path, trigger="t")
    assert "6400" in str(e.value) and "4096" in str(e.value)
    with pytest.raises(DataError, match="big.png"):
        load_image(big)


def _linked_root(tmp_path):
    """A training root whose caption and one image are links to files outside it."""
    outside = tmp_path / "outside"
    secret = text(outside / "secret.txt", "TOPSECRET-token")
    private = img(outside / "private.png", color=(1, 2, 3))
    root = tmp_path / "root"
    img(root / "set" / "a.png")
    (root / "set" / "a.txt").symlink_to(secret)
    (root / "set" / "b.png").symlink_to(private)
    return root, outside


def test_links_out_of_the_allowed_roots_are_refused(tmp_path):
    root, outside = _linked_root(tmp_path)
    with pytest.raises(DataError, match=r"a\.txt") as e:
        scan_folder(root / "set", trigger="t", roots=[root])
    assert "TOPSECRET" not in str(e.value) and str(outside) not in str(e.value)  # the target is not revealed
    (root / "set" / "a.txt").unlink()
    with pytest.raises(DataError, match=r"b\.png"):
        scan_folder(root / "set", trigger="t", roots=[root])
    # a link that stays inside the roots is fine
    (root / "set" / "b.png").unlink()
    (root / "set" / "b.png").symlink_to(root / "set" / "a.png")
    assert len(scan_folder(root / "set", trigger="t", roots=[root])) == 2


def test_a_linked_folder_out_of_the_roots_is_refused_and_the_confinement_applies_to_nested_scans(tmp_path):
    from stylelora.data import confined_to

    root, outside = _linked_root(tmp_path)
    for name in ("a.txt", "b.png"):
        (root / "set" / name).unlink()
    (root / "set" / "more").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="more"):
        scan_folder(root / "set", trigger="t", roots=[root])
    with confined_to([root]):  # what the web UI wraps around train(): the scan inside it is confined too
        with pytest.raises(DataError, match="more"):
            scan_folder(root / "set", trigger="t")
    # the CLI (no roots): a user's own links are followed, so linked-in subsets keep working
    items = scan_folder(root / "set", trigger="t")
    assert sorted(it.path.name for it in items) == ["a.png", "private.png"]
