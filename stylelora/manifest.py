"""File manifests: the size and sha256 of files, written beside them and checked before they are trusted.

Checkpoints (in their state.json) and the built-in base (its stylelora-manifest.json) record one when written;
``damage`` says what changed since, so damaged state is named (and skipped or rebuilt) instead of failing later in
a library with an unhelpful error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record(folder, names) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` for the files ``names`` (paths relative to ``folder``)."""
    folder = Path(folder)
    return {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names}


def damage(folder, recorded: dict, names=None) -> str | None:
    """Why the files in ``folder`` differ from ``recorded`` (None if they match): the first file that is missing,
    has another size, or another sha256. ``names``: the files to check (default: every recorded one)."""
    folder = Path(folder)
    for name in names if names is not None else recorded:
        want, file = recorded.get(name), folder / name
        if not file.is_file():
            return f"{name} is missing"
        if not isinstance(want, dict):
            return f"{name} is not in the record written with it"
        size = file.stat().st_size
        if size != want.get("size"):
            return f"{name} has {size} bytes, {want.get('size')} were written (truncated or replaced)"
        if file_sha256(file) != want.get("sha256"):
            return f"{name} does not match the checksum written with it (corrupted or replaced)"
    return None
