"""Path safety for the web UI: every name or path typed or uploaded in a browser is checked here before use.

The rule: the UI reads and writes only inside the adapter folder, the training roots and its own work folder.
A path is resolved (symlinks followed) before the check, so ``../``, absolute paths and links that point out
of a root are all refused the same way.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from pathlib import Path, PurePosixPath

from stylelora.errors import StyleloraError

ADAPTER_SUFFIX = ".safetensors"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()\-]{0,119}$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


class UnsafePathError(StyleloraError):
    """A name or path from the browser points outside the folders the UI may use, or is not a plain name."""


class UploadError(StyleloraError):
    """An uploaded file is refused (too big, wrong kind, corrupt, unsafe archive member)."""


def safe_name(name: str, what: str = "name") -> str:
    """A single file or folder name: letters, digits, space and ``._+()-``; no separators, no leading dot."""
    name = (name or "").strip()
    if not name:
        raise UnsafePathError(f"{what} is empty")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name:
        raise UnsafePathError(f"{what} {name!r} must be a plain name, without '/', '\\' or '..'")
    if not _NAME.match(name) or name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise UnsafePathError(f"{what} {name!r} may only use letters, digits, spaces and . _ + ( ) -, must start "
                              "with a letter or digit and be at most 120 characters")
    return name


def adapter_stem(name: str) -> str:
    """A library name without a ``.safetensors`` suffix, checked part by part (``sub/name`` is allowed)."""
    name = (name or "").strip()
    if name.lower().endswith(ADAPTER_SUFFIX):
        name = name[: -len(ADAPTER_SUFFIX)]
    if name.startswith("/") or "\\" in name:
        raise UnsafePathError(f"adapter name {name!r} must be a name in the library, not a path")
    parts = name.split("/")
    return "/".join(safe_name(p, "adapter name") for p in parts)


def is_within(path: Path, root: Path) -> bool:
    """Whether ``path`` (already resolved) is ``root`` or lies under it (``root`` resolved here)."""
    root = Path(root).resolve()
    return path == root or root in path.parents


def within(root: Path, candidate: str | Path, *, what: str = "path", must_exist: bool = True) -> Path:
    """``candidate`` (relative to ``root`` or absolute) resolved, if it lies inside ``root``; refused otherwise."""
    root = Path(root).resolve()
    text = str(candidate).strip()
    if not text or "\x00" in text:
        raise UnsafePathError(f"{what} is empty or invalid")
    raw = Path(text).expanduser() if text.startswith("~") else Path(text)
    full = raw if raw.is_absolute() else root / raw
    resolved = full.resolve(strict=False)
    if not is_within(resolved, root):
        raise UnsafePathError(f"{what} {text!r} is outside the allowed folder {root}")
    if must_exist and not resolved.exists():
        raise UnsafePathError(f"{what} {text!r} does not exist in {root}")
    return resolved


def within_any(roots, candidate: str | Path, *, what: str = "folder") -> Path:
    """Like ``within`` for the first of several roots that holds ``candidate``."""
    roots = [Path(r).resolve() for r in roots]
    if not roots:
        raise UnsafePathError(f"no server folders are allowed (start the UI with --train-root DIR to pick {what}s "
                              "on the server), upload images instead")
    for root in roots:
        try:
            return within(root, candidate, what=what)
        except UnsafePathError:
            continue
    raise UnsafePathError(f"{what} {str(candidate).strip()!r} is not inside an allowed folder "
                          f"({', '.join(str(r) for r in roots)})")


def adapter_path(root: Path, name: str, *, must_exist: bool = True) -> Path:
    """The file of library adapter ``name`` inside ``root`` (checked, symlinks included)."""
    stem = adapter_stem(name)
    path = within(root, stem + ADAPTER_SUFFIX, what=f"adapter {stem!r}", must_exist=False)
    if must_exist and not path.is_file():
        raise UnsafePathError(f"adapter {stem!r} is not in the library ({Path(root)})")
    return path


def image_folders(roots, *, max_depth: int = 3, limit: int = 500) -> list[Path]:
    """Folders under ``roots`` holding at least one image (hidden folders and links out of a root skipped)."""
    found: list[Path] = []
    for root in (Path(r).resolve() for r in roots):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            depth = len(here.relative_to(root).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < max_depth)
            if any(f.lower().endswith(IMAGE_SUFFIXES) for f in filenames):
                found.append(here)
            if len(found) >= limit:
                return found
    return found


def check_size(path: Path, max_bytes: int, what: str) -> int:
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise UploadError(f"{what} is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    if size == 0:
        raise UploadError(f"{what} is empty")
    return size


def _member_path(name: str) -> PurePosixPath | None:
    """A zip member name as a safe relative path, or None for names that must be skipped."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or re.match(r"^[A-Za-z]:", name):
        raise UploadError(f"archive member {name!r} has an unsafe path (absolute or with '..'); refused")
    if any(part.startswith(".") or part == "__MACOSX" for part in p.parts):
        return None
    return p


MAX_RATIO = 100  # unpacked/packed size; images (already compressed) rarely pass 10, a zip bomb reaches 10^6
_RATIO_FLOOR = 16 << 20  # below this an archive may compress as well as it likes (captions, flat test images)


def extract_images(archive: Path, dest: Path, *, max_files: int = 2000, max_bytes: int = 2 << 30) -> list[Path]:
    """Unpack the images and captions of a zip into ``dest``: no links, no paths out of ``dest``, size-capped.

    ``max_bytes`` bounds what is written (the caller passes what is left of the upload's budget). The sizes the
    archive declares are checked before anything is written, and the bytes actually written are counted while
    unpacking, so an archive that lies about its sizes stops at the limit too. On a refusal the files written
    so far stay for the caller to remove (``prepare_uploads`` removes the whole folder).
    """
    dest = Path(dest).resolve()
    name = Path(archive).name
    written: list[Path] = []
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(f"{name} is not a readable zip archive ({e})") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        declared = sum(m.file_size for m in members)
        packed = max(1, Path(archive).stat().st_size)
        if declared > max_bytes:
            raise UploadError(f"{name} unpacks to {declared / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.1f} "
                              "MiB left of the upload limit (--max-upload-mb); refused")
        if declared > _RATIO_FLOOR and declared > MAX_RATIO * packed:
            raise UploadError(f"{name} would unpack {packed / 2**10:.0f} KiB into {declared / 2**20:.0f} MiB (a "
                              "'zip bomb'; image archives barely compress); refused")
        budget = max_bytes
        for m in members:
            rel = _member_path(m.filename)
            if rel is None or not rel.suffix.lower() in IMAGE_SUFFIXES + CAPTION_SUFFIXES:
                continue
            if stat.S_ISLNK(m.external_attr >> 16):
                raise UploadError(f"archive member {m.filename!r} is a symbolic link; refused")
            rel = PurePosixPath(*(clean_name(part, "folder") for part in rel.parts))
            target = (dest / rel).resolve()
            if not is_within(target, dest):
                raise UploadError(f"archive member {m.filename!r} would be written outside the upload folder")
            if len(written) >= max_files:
                raise UploadError(f"{name} holds more than {max_files} files; refused")
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(target)
            budget -= _copy_member(zf, m, target, budget, name)
    return written


def _copy_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, budget: int, archive: str) -> int:
    """Write one member to ``target``, stopping as soon as more than ``budget`` bytes came out; bytes written."""
    done = 0
    try:
        with zf.open(member) as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                done += len(chunk)
                if done > budget:
                    raise UploadError(f"{archive} unpacks to more than the upload limit (--max-upload-mb); "
                                      "refused")
                out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, OSError,
            ValueError) as e:  # a damaged member (bad CRC, truncated data), an encrypted one, an odd method
        raise UploadError(f"{archive}: member {member.filename!r} cannot be unpacked ({e}); refused") from None
    return done


def clean_name(name: str, default: str = "upload") -> str:
    """A plain name made from a file name a browser sent: its last part, other characters replaced by ``_``."""
    name = PurePosixPath(str(name).replace("\\", "/")).name
    name = re.sub(r"[^A-Za-z0-9 ._+()\-]", "_", name)
    name = re.sub(r"\.{2,}", ".", name).lstrip(" ._-")
    stem, dot, suffix = name.rpartition(".") if "." in name[1:] else (name, "", "")
    name = (stem[:100].rstrip(" ") + dot + suffix[:16]) if dot else name[:100].rstrip(" ")
    if not name or name.split(".")[0].lower() in _WINDOWS_RESERVED:
        name = default + (("_" + name) if name else "")
    return safe_name(name, "uploaded file name")


def upload_name(path: str | Path) -> str:
    """The original file name of an upload as a safe plain name (directories dropped, odd characters replaced)."""
    return clean_name(str(path))
