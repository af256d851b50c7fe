"""The adapter library: the ``.safetensors`` files in one folder, their metadata, and import / convert / merge / delete.

Every function takes the library folder and a checked name; nothing here reads or writes outside that folder
(except reading an upload, which is validated before a copy of it is kept).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stylelora.atomic import copy_file
from stylelora.errors import AdapterError, StyleloraError
from stylelora.prompt import is_run_folder

from . import paths


MAX_THUMBNAIL_CHARS = 4_000_000  # a data: URL; ours are ~20 KB


@dataclass
class AdapterInfo:
    """What the library shows about one adapter file."""

    name: str  # path relative to the library folder, without .safetensors
    path: Path
    size_bytes: int
    family: str | None = None
    rank: int | None = None
    alpha: float | None = None
    format: str | None = None
    trigger: str | None = None
    model_hash: str | None = None  # sshs_model_hash (A1111 shows the first 12 hex digits)
    training: dict | None = None
    thumbnail: Path | None = None
    error: str | None = None  # set when the file cannot be read
    components: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line on how the adapter was made."""
        t = self.training or {}
        bits = []
        if t.get("steps"):
            bits.append(f"{t['steps']} steps")
        if t.get("num_train_images"):
            bits.append(f"{t['num_train_images']} images")
        if t.get("learning_rate") is not None:
            bits.append(f"lr {t['learning_rate']:g}")
        if t.get("base_model"):
            bits.append(f"base {t['base_model']}")
        if t.get("resolution"):
            bits.append(str(t["resolution"]))
        if t.get("finished_at"):
            bits.append(str(t["finished_at"])[:16].replace("T", " "))
        if t.get("merged_from"):
            bits.append("merged from " + _merged_names(t["merged_from"]))
        return ", ".join(bits) or "-"

    def row(self) -> list:
        """A row of the library table."""
        size = f"{self.size_bytes / 2**20:.1f} MiB"
        if self.error:
            return [self.name, "?", "", "", self.error, "", size]
        return [self.name, self.family or "?", self.rank or "", self.trigger or "", self.summary(),
                (self.model_hash or "")[:12], size]


TABLE_HEADERS = ["name", "family", "rank", "trigger", "training", "hash", "size"]


class Library:
    """The adapter folder, with a metadata cache keyed by (path, size, mtime)."""

    def __init__(self, root: Path, thumbs_dir: Path, *, max_upload_bytes: int = 1 << 30):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.thumbs_dir = Path(thumbs_dir)
        self.max_upload_bytes = max_upload_bytes
        self.version = 0  # bumped on every change, so pages can tell when to refresh
        self._cache: dict[tuple[str, int, int], AdapterInfo] = {}
        self._reserved: set[str] = set()  # names of training runs in progress (see reserve)

    # ------------------------------------------------------------------------------------------ reading
    def files(self) -> dict[str, Path]:
        """{library name: file} for every adapter under the folder (hidden entries and links out skipped)."""
        out: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            # hidden folders, and a run's checkpoint and sample folders (their files are not adapters)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not is_run_folder(d))
            for f in sorted(filenames):
                if f.startswith(".") or not f.lower().endswith(paths.ADAPTER_SUFFIX):
                    continue
                p = here / f
                if not paths.is_within(p.resolve(), self.root) or not p.resolve().is_file():
                    continue  # a link that leaves the folder
                if _is_embedding_file(p):
                    continue  # an adapter's sidecar embedding (for other tools), not an adapter
                rel = p.relative_to(self.root).as_posix()
                out[rel[: -len(paths.ADAPTER_SUFFIX)]] = p
        return out

    def names(self) -> list[str]:
        return list(self.files())

    def path(self, name: str, *, must_exist: bool = True) -> Path:
        return paths.adapter_path(self.root, name, must_exist=must_exist)

    def find(self, name: str) -> str:
        """A library name for ``name``: exact, else a unique match of the file stem (case-insensitive)."""
        files = self.files()
        stem = paths.adapter_stem(name)
        if stem in files:
            return stem
        hits = [n for n in files if n.rsplit("/", 1)[-1].lower() == stem.rsplit("/", 1)[-1].lower()]
        if len(hits) == 1:
            return hits[0]
        listing = ", ".join(files) or "(the library is empty)"
        raise AdapterError(f"adapter {name!r} is not in the library" + (" (several match)" if hits else "")
                           + f". Available: {listing}")

    def info(self, name: str) -> AdapterInfo:
        path = self.path(name)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = self._describe(name, path, st.st_size)
        return self._cache[key]

    def entries(self) -> list[AdapterInfo]:
        return [self.info(n) for n in self.files()]

    def _describe(self, name: str, path: Path, size: int) -> AdapterInfo:
        from stylelora.formats import describe, read_metadata

        try:
            d = describe(path, hashes=False)
            md = read_metadata(path)
        except (StyleloraError, OSError, ValueError) as e:
            return AdapterInfo(name, path, size, error=f"unreadable: {e}")
        except Exception as e:  # noqa: BLE001 - a file's metadata is others' data: one odd file never breaks a listing
            return AdapterInfo(name, path, size, error=f"unreadable metadata ({type(e).__name__})")
        comps = d.get("components") or {}
        first = comps.get("unet") or next(iter(comps.values()), {})
        model_hash = d["hashes"].get("sshs_model_hash")
        if not model_hash:
            from stylelora.blend import file_digests

            model_hash = file_digests(path)[1]
        training = d.get("training")
        if training is not None and md.get("modelspec.merged_from"):
            training = {**training, "merged_from": md["modelspec.merged_from"]}
        elif md.get("modelspec.merged_from"):
            training = {"merged_from": md["modelspec.merged_from"]}
        return AdapterInfo(name, path, size, family=d.get("family"), rank=first.get("rank"), alpha=first.get("alpha"),
                           format=d.get("format"), trigger=d.get("trigger"), model_hash=model_hash,
                           training=training, thumbnail=self._thumbnail(md.get("modelspec.thumbnail")),
                           components={k: {"modules": v["modules"], "rank": v["rank"], "alpha": v["alpha"]}
                                       for k, v in comps.items()})

    def _thumbnail(self, data_url: str | None) -> Path | None:
        """The ModelSpec thumbnail (a data: URL) as a PNG in the work folder; None if absent or not an image."""
        if not data_url or len(data_url) > MAX_THUMBNAIL_CHARS or "," not in data_url:
            return None
        from PIL import Image, UnidentifiedImageError

        out = self.thumbs_dir / (hashlib.sha256(data_url.encode()).hexdigest()[:20] + ".png")
        if out.exists():
            return out
        try:
            raw = base64.b64decode(data_url.split(",", 1)[1], validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > 2048 * 2048:
                    return None
                im = im.convert("RGB")
                im.thumbnail((256, 256))
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out)
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            return None
        return out

    def details(self, name: str) -> dict:
        """Everything known about one adapter, for the details panel."""
        i = self.info(name)
        return {"name": i.name, "file": i.path.name, "size_bytes": i.size_bytes, "family": i.family,
                "format": i.format, "rank": i.rank, "alpha": i.alpha, "trigger": i.trigger,
                "sshs_model_hash": i.model_hash, "components": i.components, "training": i.training,
                "error": i.error}

    # ------------------------------------------------------------------------------------------ writing
    def entry(self, name: str) -> Path:
        """The file of library entry ``name`` with its folder resolved and checked, but its last part not
        resolved: for a symlinked alias this is the link itself, so deleting or replacing the alias never touches
        the adapter it points to."""
        stem = paths.adapter_stem(name)
        parent, _, leaf = stem.rpartition("/")
        folder = paths.within(self.root, parent or ".", what=f"adapter {stem!r}", must_exist=False)
        return folder / (leaf + paths.ADAPTER_SUFFIX)

    def reserve(self, name: str) -> None:
        """Keep ``name`` for a training run in progress: imports, converts and merges refuse it until ``release``
        (a finished run must never find its name taken by the library's own actions)."""
        self._reserved.add(paths.adapter_stem(name))

    def release(self, name: str) -> None:
        self._reserved.discard(paths.adapter_stem(name))

    def _target(self, name: str, overwrite: bool) -> Path:
        stem = paths.adapter_stem(name)
        if stem in self._reserved:
            raise AdapterError(f"the name {stem!r} is reserved by the training run in progress; choose another name")
        dest = self.entry(stem)
        if os.path.lexists(dest) and not overwrite:
            raise AdapterError(f"an adapter named {stem!r} already exists in the library; "
                               "choose another name, or delete that one first")  # the UI has no overwrite switch
        return dest

    def keep_file(self, src: Path, name: str, *, overwrite: bool = False) -> Path:
        """Copy ``src`` into the library as ``name`` atomically (temp file in the folder, then rename)."""
        dest = self._target(name, overwrite)
        copy_file(src, dest, fsync=True)
        _write_sidecars(dest)
        self.version += 1
        return dest

    def keep_trained(self, src: Path, name: str, *, overwrite: bool = False) -> str:
        """Copy a finished training run's adapter into the library as ``name``; if another program took that name
        during the run (and overwriting was not asked for), as ``name-2``, ``name-3``, … Returns the name used:
        a finished run is never thrown away for its name."""
        stem = paths.adapter_stem(name)
        for i in range(1, 1000):
            candidate = stem if i == 1 else f"{stem}-{i}"
            if i > 1 and (candidate in self._reserved or len(candidate.rsplit("/", 1)[-1]) > 120):
                continue
            dest = self.entry(candidate)
            if (i == 1 and overwrite) or not os.path.lexists(dest):
                copy_file(src, dest, fsync=True)
                _write_sidecars(dest)
                self.version += 1
                return candidate
        raise AdapterError(f"no free name like {stem!r} in the library for the trained adapter")

    def import_file(self, upload: str | Path, name: str | None = None, *, pipe=None, overwrite: bool = False) -> str:
        """Validate an uploaded adapter (size, safetensors header, LoRA keys) and keep a copy; returns its name."""
        upload = Path(upload)
        original = paths.upload_name(upload.name)
        if not original.lower().endswith(paths.ADAPTER_SUFFIX):
            raise paths.UploadError(f"{original}: only .safetensors adapter files can be imported (pickle files "
                                    ".ckpt/.pt/.bin can run code when loaded; convert them first)")
        name = paths.adapter_stem(name or original)
        paths.check_size(upload, self.max_upload_bytes, original)
        try:
            _load_checked(upload, pipe)
        except AdapterError as e:
            raise paths.UploadError(f"{original} was not imported: {str(e).replace(str(upload), original)}") from None
        self.keep_file(upload, name, overwrite=overwrite)
        return name

    def convert(self, name: str, to: str, new_name: str | None = None, *, pipe=None, overwrite: bool = False) -> str:
        """Write adapter ``name`` in layout ``to`` (kohya | peft) as a new library entry; returns its name."""
        from stylelora.formats import FORMATS, save_adapter

        if to not in FORMATS:
            raise AdapterError(f"unknown layout {to!r}; choose one of {', '.join(FORMATS)}")
        src = self.path(name)
        new = paths.adapter_stem(new_name or f"{paths.adapter_stem(name)}-{to}")
        dest = self._target(new, overwrite)
        if dest == src:
            raise AdapterError("the converted adapter needs a name different from the original")
        adapter, used_pipe = _load_checked(src, pipe)
        adapter.name = dest.stem
        save_adapter(adapter, dest, format=to, pipe=used_pipe)
        self.version += 1
        return new

    def merge(self, weights: dict[str, tuple[float, float]], new_name: str, *, rank: int | None = None, pipe=None,
              overwrite: bool = False) -> str:
        """Merge weighted library adapters into a new one (exact, or SVD to ``rank``); returns its name."""
        from stylelora.merge import merge_files
        from stylelora.prompt import LoraRef

        if len(weights) < 1:
            raise AdapterError("pick at least one adapter to merge")
        new = paths.adapter_stem(new_name)
        dest = self._target(new, overwrite)
        refs = [LoraRef(str(self.path(n)), float(u), float(t)) for n, (u, t) in weights.items()]
        if any(Path(r.source).resolve() == dest.resolve() for r in refs):
            raise AdapterError("the merged adapter cannot overwrite one of its sources; choose another name")
        merge_files(refs, dest, rank=rank, pipe=pipe)
        self.version += 1
        return new

    def resize(self, name: str, new_name: str | None = None, *, pipe=None, measure=None, **rule):
        """Resize adapter ``name`` into a new library entry by ``stylelora.resize`` rules (``rule``: rank, energy,
        ratio, cumulative, budget, max_rank, max_error); the source is never replaced. ``measure`` (a base with
        no adapters fused) adds the UNet-output check and allows ``max_error``. Returns (new name, ResizeResult).

        Not ``resize_file``: that one uses its ``pipe`` both to resolve module names and for the functional check,
        and here the names always come from the running base while the check (which needs the model) is optional.
        The steps are the same: check the rule, load, ``resize``, save with ``resize_metadata`` in the source's
        layout (sidecar embedding files are written by ``save_adapter``)."""
        from stylelora.formats import save_adapter
        from stylelora.resize import check_rule, output_format, resize, resize_metadata

        check_rule(**rule)
        src = self.path(name)
        new = paths.adapter_stem(new_name or f"{paths.adapter_stem(name)}-resized")
        dest = self._target(new, overwrite=False)  # never an existing entry, so never the source or an alias of it
        adapter, used_pipe = _load_checked(src, pipe)
        result = resize(adapter, pipe=measure, **rule)
        result.adapter.name = dest.stem
        save_adapter(result.adapter, dest, format=output_format(src),
                     metadata=resize_metadata(result, src, dest), pipe=used_pipe)
        self.version += 1
        return new, result

    def delete(self, name: str) -> Path:
        """Delete library entry ``name``. A symlinked alias loses the link, never the file it points to; a link
        out of the folder is refused (it is not listed, and its target is none of the library's business)."""
        path = self.entry(name)
        if path.is_symlink():
            if not paths.is_within(path.resolve(), self.root):
                raise paths.UnsafePathError(f"adapter {paths.adapter_stem(name)!r} is a link to a file outside the "
                                            f"library ({self.root}); it is not deleted from here")
        elif not path.is_file():
            raise paths.UnsafePathError(f"adapter {paths.adapter_stem(name)!r} is not in the library ({self.root})")
        sidecars = [] if path.is_symlink() else _sidecars_of(path)
        path.unlink()  # on a link: the link itself
        for extra in sidecars:  # the adapter's embedding files for other tools go with it
            extra.unlink(missing_ok=True)
        self.version += 1
        return path


def _merged_names(text: str) -> str:
    try:  # others' metadata: any shape, any depth; never let it break a listing
        rows = json.loads(text)
        return ", ".join(f"{r['name']} {r['weight']}" for r in rows)
    except (ValueError, TypeError, KeyError, RecursionError):
        return "several adapters"


def _load_checked(path: Path, pipe):
    """Load an adapter against the running base; if that fails, against its own family. Returns (adapter, pipe)."""
    from stylelora.formats import load_adapter

    if pipe is None:
        return load_adapter(path), None
    try:
        return load_adapter(path, pipe=pipe), pipe
    except AdapterError as first:
        try:  # a valid adapter for another model family: keep it in the library all the same
            return load_adapter(path), None
        except AdapterError:
            raise first from None


def _is_embedding_file(path: Path) -> bool:
    from stylelora.formats.embeddings import is_embedding_file

    return is_embedding_file(path)


def _sidecars_of(path: Path) -> list[Path]:
    from stylelora.formats.embeddings import sidecars_of

    return sidecars_of(path)


def _write_sidecars(dest: Path) -> None:
    """Beside a library copy of an adapter with learnt tokens, its sidecar embedding file(s) for tools that do not
    read embeddings bundled in a LoRA file (ComfyUI, diffusers), named after the copy. Files without embeddings
    are not read further; one that cannot be read without its base keeps just the adapter (it loads with a base)."""
    from safetensors import safe_open

    from stylelora.formats import load_adapter
    from stylelora.formats.embeddings import is_embedding_key, write_sidecars

    with safe_open(str(dest), "pt") as f:
        if not any(is_embedding_key(k) for k in f.keys()):
            return
    try:
        adapter = load_adapter(dest)
    except AdapterError:
        return
    if adapter.embeddings:
        write_sidecars(dest, adapter.embeddings, adapter.family)
