"""Atomic writes: build a file or folder under a temporary name beside its destination, then rename it into place.

A reader (or a run killed mid-write) sees either the previous version or the complete new one, never a torn one.
The temporary lives in the destination's folder because a rename is only atomic within one filesystem.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import NoSpaceError

# How writers report a full disk. OSError carries the errno; safetensors words it ("No space left on device (os
# error 28)"); torch's zip writer loses it and says only that its stream failed.
_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_SPACE_WORDS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
_TORCH_WRITE_FAILED = ("basic_ios::clear", "iostream error", "inline_container.cc", "PytorchStreamWriter failed",
                       "unexpected pos")
_LOW_SPACE = 64 * 1024 * 1024  # below this much free space, a torch write failure is taken to be a full disk


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def no_space_error(exc: BaseException, path) -> NoSpaceError | None:
    """``exc`` raised while writing ``path`` as a ``NoSpaceError`` naming the path, or None for other errors.

    ``path`` may be None where the writer did not say what it was writing (then the message names no file).

    The one place that recognises a full disk (or quota) in whatever form a writer reports it, so every writer
    says "no space left on <path>" instead of an errno, a Rust I/O error or torch's "basic_ios::clear".
    """
    if isinstance(exc, NoSpaceError):
        return exc
    path = Path(path) if path is not None else None
    text = str(exc).lower()
    full = (isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS) or any(w in text for w in _NO_SPACE_WORDS)
    if not full and path is not None and isinstance(exc, RuntimeError) and any(w.lower() in text
                                                                               for w in _TORCH_WRITE_FAILED):
        free = _free_bytes(path.parent)  # checked before the caller deletes its partial temporary
        full = free is not None and free < _LOW_SPACE
    if not full:
        return None
    if path is None:
        return NoSpaceError(errno.ENOSPC, f"no space left on the device being written ({exc}). Free some space or "
                                          "write elsewhere, then run again.")
    free = _free_bytes(path.parent)
    where = f" ({free // 1024} KiB free)" if free is not None else ""
    return NoSpaceError(errno.ENOSPC, f"no space left on {path.parent}{where} while writing {path.name}. Nothing "
                                      "partial was left there (complete files written before are kept). Free some "
                                      "space or write elsewhere, then run again.", str(path))


def _raise_no_space(exc: BaseException, path: Path) -> None:
    err = no_space_error(exc, path)
    if err is not None and err is not exc:
        raise err from exc


def _fresh_name(dest: Path, suffix: str) -> Path:
    return dest.with_name(f".{dest.name}.{secrets.token_hex(4)}{suffix}")


def _new_temp_file(dest: Path, suffix: str) -> Path:
    # os.open with mode 0o666 lets the umask decide (0644 usually); tempfile.mkstemp would force 0600.
    for _ in range(100):
        tmp = _fresh_name(dest, suffix)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {dest}")


def _new_temp_file_or_raise(dest: Path, suffix: str) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return _new_temp_file(dest, suffix)
    except OSError as e:
        _raise_no_space(e, dest)
        raise


def _new_temp_folder(dest: Path) -> Path:
    for _ in range(100):
        tmp = _fresh_name(dest, ".tmp")
        try:
            tmp.mkdir(0o777)  # umask applies, unlike tempfile.mkdtemp's 0700
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary folder next to {dest}")


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder cannot be opened on some platforms (Windows)
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems cannot fsync a folder
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


@contextmanager
def atomic_path(dest, *, fsync: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` for the caller to write; on success it is renamed over ``dest``.

    On an error the temporary is removed and ``dest`` keeps its previous content. The new file gets the old
    file's permissions, or 0666 minus the umask for a new one. ``fsync`` makes the data and the rename durable
    (for files whose loss after a crash costs work: adapters, checkpoints). ``suffix`` matters to writers that
    pick a format from the name (PIL).
    """
    dest = Path(dest)
    tmp = _new_temp_file_or_raise(dest, suffix)
    try:
        yield tmp
        if dest.is_file():
            os.chmod(tmp, dest.stat().st_mode & 0o7777)
        if fsync:
            _fsync(tmp)
        if dest.is_dir() and not dest.is_symlink():
            _swap_into_place(tmp, dest)  # a file cannot be renamed over a folder
        else:
            os.replace(tmp, dest)
        if fsync:
            _fsync(dest.parent)
    except Exception as e:
        _raise_no_space(e, dest)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(dest, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``dest`` atomically; returns ``dest`` as a Path."""
    dest = Path(dest)
    with atomic_path(dest, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return dest


def write_text(dest, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``dest`` atomically; returns ``dest`` as a Path."""
    return write_bytes(dest, text.encode("utf-8"), fsync=fsync)


def copy_file(src, dest, *, fsync: bool = False) -> Path:
    """Copy ``src`` to ``dest`` atomically (contents only; ``dest`` gets normal permissions)."""
    dest = Path(dest)
    with atomic_path(dest, fsync=fsync) as tmp, open(src, "rb") as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    return dest


@contextmanager
def atomic_folder(dest, *, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; on success it replaces ``dest`` (a folder or file).

    A folder cannot be renamed over a non-empty one, so the previous ``dest`` is first moved aside and deleted
    only once the new one is in place; if that rename fails the previous one is put back. On an error in the
    body the temporary folder is deleted and ``dest`` is untouched.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp_folder(dest)
    except OSError as e:
        _raise_no_space(e, dest)
        raise
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        _swap_into_place(tmp, dest)
        if fsync:
            _fsync(dest.parent)
    except Exception as e:
        _raise_no_space(e, dest)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    old = None
    if dest.exists() or dest.is_symlink():
        old = _fresh_name(dest, ".old")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)  # put the previous version back
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _same_or_inside(path: Path, output: Path) -> bool:
    """Whether writing ``output`` (a file, or a folder that is replaced whole) would destroy ``path``: the same file
    (also through a symlink or a hard link), or ``path`` inside ``output``."""
    try:
        rp, ro = path.resolve(), output.resolve()
    except OSError:
        return False
    if rp == ro or ro in rp.parents:
        return True
    try:
        return output.exists() and path.exists() and os.path.samefile(path, output)
    except OSError:
        return False


def check_output(output, inputs, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse an output that would replace one of the ``inputs`` (ever, whatever ``overwrite`` says), and an
    existing output unless ``overwrite``. Called before any slow work, so nothing is computed for nothing."""
    from .errors import ConfigError

    output = Path(output)
    for src in inputs:
        if src is not None and _same_or_inside(Path(src), output):
            raise ConfigError(f"output {output} is the input {src}, or a path that would replace the input; choose "
                              "another output path")
    if os.path.lexists(output) and not overwrite:
        raise ConfigError(f"output {output} already exists; pass {flag} to replace it")
