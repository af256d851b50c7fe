"""Everything the web UI does, as plain methods of one ``Studio``: testable without Gradio, called by ``app.py``.

A Studio holds the one base model of the process, a ``Blender`` on it (moving a weight re-fuses layers; the base
is never reloaded), the adapter library, the training roots and at most one training job. One lock guards the
model: generation, grids, training and base switches take turns; the library and status calls never wait on it.
Errors are ``StyleloraError``s whose message is meant for the page.
"""

from __future__ import annotations

import gc
import itertools
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from stylelora.errors import AdapterError, ConfigError, DataError, StyleloraError

from . import paths
from .library import Library
from .training import TrainJob, TrainRequest, build_config, check_slot_fits, prepare_uploads

log = logging.getLogger(__name__)

MAX_IMAGES, MAX_STEPS, MAX_SIDE, MAX_CELLS = 16, 150, 2048, 64
Progress = Callable[[int, int, str], None]  # (done, total, what)


class BusyError(StyleloraError):
    """The model is in use by a training run or a base switch."""


@dataclass
class GenerateRequest:
    """One Generate click. ``adapters``: {library name: weight or (unet weight, text-encoder weight)};
    ``blocks``: {library name: block weights} for some of them, as the page's block editor sends them (a preset name
    such as ``INS`` or a comma list of 17 (SD1/SD2) or 12 (SDXL) values; empty = every block at 1), the same as
    ``Blender.set({name: (weight, blocks)})`` and ``<lora:name:w:lbw=…>``."""

    prompt: str
    negative_prompt: str = ""
    adapters: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)
    seed: int = -1  # -1: a random seed (the one used is returned and written into the PNGs)
    steps: int = 20
    guidance: float = 7.0
    width: int | None = None  # None: the base's native size
    height: int | None = None
    sampler: str = "default"  # "default" keeps the base's own scheduler
    num_images: int = 1


@dataclass
class GenerateResult:
    paths: list[Path]  # PNGs with the A1111 ``parameters`` chunk
    infotexts: list[str]
    seed: int
    notes: list[str] = field(default_factory=list)  # e.g. a block vector that zeroes blocks the adapter uses


@dataclass
class GridRequest:
    """An X/Y sweep: X is one adapter's weight; Y is seeds, another adapter's weight, or nothing."""

    settings: GenerateRequest
    x_adapter: str
    x_values: list[float]
    y_kind: str = "seed"  # "seed" | "adapter" | "none"
    y_adapter: str | None = None
    y_values: list[float] = field(default_factory=list)


@dataclass
class GridResult:
    path: Path  # the labelled grid (PNG)
    cells: list[Path]  # every cell as its own PNG with its parameters
    infotext: str
    seed: int


@dataclass
class BlendReport:
    """The Blend report panel: ``interference.report`` of the picked adapters, as a Markdown table per pair, and
    the weight-sweep grid (two adapters, optional)."""

    result: dict  # interference.report(...): {"adapters": [...], "pairs": [...]}
    table: str  # Markdown
    grid: Path | None = None  # the labelled sweep grid (PNG); rows: the first adapter's weight, columns: the second's
    suggested: dict | None = None  # cli.blend_report.suggestion(...) at the picked weight each; None if refused
    suggestion: str = ""  # Markdown: the "Suggested block weights" block (prompt tags and a line per contested block)


def suggestion_markdown(s: dict | None, refused: str = "") -> str:
    """``cli.blend_report.format_suggested``'s text under a heading, in a code block (the page would read the
    ``<lora:…>`` tags as HTML); ``refused``: why there is no suggestion (e.g. adapters of two model families)."""
    from stylelora.cli.blend_report import format_suggested

    if s is None:
        return f"**Suggested block weights**: none, {refused}"
    return "\n".join(["**Suggested block weights** (paste the tags into the Generate prompt)", "", "```text",
                      format_suggested(s), "```"])


def report_table(result: dict) -> str:
    """``interference.report``'s figures as Markdown: per pair a row per block (UNet down/mid/up, text encoders)
    and the total, the numbers rounded as ``stylelora blend-report`` prints them."""
    lines = []
    for pair in result["pairs"]:
        lines += [f"**{pair['a']}** vs **{pair['b']}**", "",
                  "| block | modules | cosine | input | output | ‖ΔW_a‖ | ‖ΔW_b‖ |", "|---|--:|--:|--:|--:|--:|--:|"]
        for name, f in [*pair["blocks"].items(), ("total", pair["total"])]:
            lines.append(f"| {name} | {f['modules']} | {f['cosine']:+.3f} | {f['input']:.3f} | {f['output']:.3f} | "
                         f"{f['norm_a']:.3g} | {f['norm_b']:.3g} |")
        if pair["only_a"] or pair["only_b"]:
            lines.append(f"\nModules in one adapter only (no overlap): {pair['only_a']} / {pair['only_b']}")
        lines.append("")
    lines.append("cosine: the updates push the same weights the same way (+1), unrelated ways (0) or opposite ways "
                 "(−1); input / output: 0 = they read / write orthogonal directions, 1 = the same ones (blocks "
                 "weighted by ‖ΔW_a‖·‖ΔW_b‖). High overlap in a block: try block weights that keep one adapter out "
                 "of it, or adapters trained in different orthogonal slots.")
    return "\n".join(lines)


def insert_triggers(prompt: str, triggers, *, at_end: bool = False) -> str:
    """``prompt`` with the trigger words it does not already say put in front (``a, b, prompt``), or with
    ``at_end`` after it (``prompt, a, b``: for the toy ``tiny`` base, whose small text encoder garbles a prompt
    with a word in front, see ``stylelora.toy.world.captioned``); a trigger phrase of several comma-separated words
    is checked word by word, case-insensitively."""
    said = {w.strip().lower() for w in re.split(r"[,\s]+", prompt or "") if w.strip()}
    missing = []
    for phrase in triggers:
        for word in (w.strip() for w in phrase.split(",")):
            if word and not set(word.lower().split()) <= said and word not in missing:
                missing.append(word)
    said_prompt = [prompt.strip()] if (prompt or "").strip() else []
    return ", ".join(said_prompt + missing if at_end else missing + said_prompt)


RESIZE_RULES = {  # the page's rule -> (resize keyword, how its value is read, what it means)
    "rank": ("rank", int, "the same rank K for every module (at most its own)"),
    "energy": ("energy", float, "keep the smallest k with Σσ²_kept ≥ E²·Σσ², E in (0, 1]"),
    "ratio": ("ratio", float, "keep every σ > σ_max / R, R ≥ 1"),
    "cumulative": ("cumulative", float, "keep the smallest k with Σσ_kept ≥ C·Σσ, C in (0, 1]"),
    "budget": ("budget", str, "bytes of LoRA factors for the whole adapter (800K, 12M, 1.5G): one global "
                              "threshold, ranks go where the energy is"),
    "max error": ("max_error", float, "the smallest global budget whose UNet output stays within EPS of the "
                                      "original's (measured on the base model)"),
}


def resize_rule(rule: str, value, max_rank=None) -> dict:
    """The page's (rule, value, max rank; 0 or empty = none) as ``stylelora.resize.resize`` keywords, checked."""
    from stylelora.resize import check_rule, parse_size

    if rule not in RESIZE_RULES:
        raise ConfigError(f"unknown resize rule {rule!r}; choose one of {', '.join(RESIZE_RULES)}")
    key, kind, _ = RESIZE_RULES[rule]
    text = str(value if value is not None else "").strip()
    if not text:
        raise ConfigError(f"give the {rule} value ({RESIZE_RULES[rule][2]})")
    try:
        number = float(text) if kind is not str else None
        if kind is int and not number.is_integer():
            raise ValueError
        parsed = kind(number) if kind is not str else text
    except (ValueError, OverflowError):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{rule} {text!r} is not {what}: {RESIZE_RULES[rule][2]}") from None
    kw = {key: parsed}
    if max_rank not in (None, "", 0):
        if isinstance(max_rank, float) and not max_rank.is_integer():
            raise ConfigError(f"max rank must be a whole number >= 1 (0 = no limit), got {max_rank:g}")
        kw["max_rank"] = int(max_rank)
    try:
        check_rule(**kw)
        if key == "budget":
            parse_size(parsed)
    except ConfigError as e:
        raise ConfigError(_page_words(str(e))) from None
    return kw


def resize_table(result, file_before: int, file_after: int) -> str:
    """What ``stylelora resize`` prints (``cli.resize.format_table``), as a Markdown table that fits the page:
    per part the modules, ranks before/after as min/median/max, energy kept, LoRA factor bytes before/after."""
    def size(n: int) -> str:
        return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

    def span(t) -> str:
        return f"{t[0]}/{t[1]:g}/{t[2]}"

    lines = ["| part | modules | rank before | rank after | energy kept | size before | size after |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in result.rows():
        lines.append(f"| {r['part']} | {r['modules']} | {span(r['before'])} | {span(r['after'])} | "
                     f"{100 * r['energy']:.2f}% | {size(r['bytes_before'])} | {size(r['bytes_after'])} |")
    lines.append(f"\nRanks as min/median/max; sizes are the LoRA factors. File {size(file_before)} → "
                 f"{size(file_after)}.")
    if result.error is not None:
        lines.append(f"UNet output relative error vs the original: {result.error:.4g}")
    return "\n".join(lines)


def _page_words(message: str) -> str:
    """A resize message with its CLI flags (--energy, --max-rank) as the page names those fields."""
    return re.sub(r"--(rank|energy|ratio|cumulative|budget|max-rank|max-error)\b",
                  lambda m: m.group(1).replace("-", " "), message)


def parse_values(text: str, *, integers: bool = False) -> list:
    """``"0, 0.25, 0.5"`` or ``"0:1:0.25"`` (start:stop:step, stop included) -> numbers."""
    text = (text or "").strip()
    kind = int if integers else float
    try:
        if text.count(":") == 2 and "," not in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ConfigError(f"range {text!r}: needs start <= stop and a step > 0")
            n = int((stop - start) / step + 1e-9) + 1
            if n > 100_000:  # refused before building the list; smaller ranges are kept whole so that the
                # grid's "would have N images" counts every value, not a truncated list
                raise ConfigError(f"range {text!r} gives {n} values; a grid holds at most {MAX_CELLS} images")
            return [kind(round(start + i * step, 6)) for i in range(n)]
        return [kind(x) for x in (v.strip() for v in text.replace(";", ",").split(",")) if x]
    except ValueError:
        raise ConfigError(f"{text!r}: give numbers separated by commas, or start:stop:step") from None


class Studio:
    """The web UI's state and actions (one per process)."""

    def __init__(self, base, adapters_dir, train_roots=(), *, bases: dict[str, str] | None = None,
                 loader: Callable | None = None, work_dir=None, max_upload_mb: int = 1024):
        self.base = base
        self.bases = dict(bases or {base.name: base.spec})  # label -> spec the UI may switch to (command line)
        self.base_label = next((k for k, v in self.bases.items() if v == base.spec), base.name)
        self._loader = loader
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="stylelora-webui-")).resolve()
        self.outputs = self.work_dir / "outputs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_mb) << 20
        self.library = Library(Path(adapters_dir), self.work_dir / "thumbs", max_upload_bytes=self.max_upload_bytes)
        if paths.is_within(self.work_dir, self.library.root):
            raise ConfigError(f"the outputs folder {self.work_dir} must not be inside the adapter folder")
        self.train_roots = [Path(r).resolve() for r in train_roots]
        for r in self.train_roots:
            if not r.is_dir():
                raise ConfigError(f"--train-root {r}: not a folder")
        self.job: TrainJob | None = None
        self.last_seed: int | None = None
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._setup_base()

    def _setup_base(self) -> None:
        from stylelora.blend import Blender

        pipe = self.base.pipe
        pipe.set_progress_bar_config(disable=True)
        self._default_scheduler = pipe.scheduler
        self.blender = Blender(self.base)
        self._loaded_sha: dict[str, str] = {}

    @property
    def native_size(self) -> int:
        pipe = self.base.pipe
        return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def close(self) -> None:
        if self.job and self.job.running:
            self.job.stop()
            self.job.join(60)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ the model
    def _acquire(self) -> None:
        if self.job and self.job.running:
            s = self.job.status()
            raise BusyError(f"the model is training {s['name']!r} (step {s['step']}/{s['steps']}); generate again "
                            "when it has finished, or stop it on the Train tab")
        if not self._lock.acquire(timeout=600):
            raise BusyError("the model stayed busy for 10 minutes; try again later")

    def switch_base(self, label: str) -> str:
        """Replace the base by another one given on the command line (explicit; the old one is released)."""
        if label not in self.bases:
            raise ConfigError(f"unknown base {label!r}; the UI can switch between: {', '.join(self.bases)}")
        if self._loader is None:
            raise ConfigError("this UI was started with a single base; restart it with --base to use another")
        self._acquire()
        try:
            old = self.bases.get(self.base_label, self.base.spec)
            self.blender.reset()
            self.base = self.blender = None  # let the old weights go before the new ones arrive
            gc.collect()
            _empty_cuda_cache()
            try:
                self.base = self._loader(self.bases[label])
            except Exception:
                self.base = self._loader(old)
                self._setup_base()
                raise
            self.base_label = label
            self._setup_base()
        finally:
            self._lock.release()
        return self.base.name

    def _sync_adapters(self, names) -> None:
        """Load ``names`` into the blender; drop adapters whose file was deleted or replaced since loading."""
        from stylelora.blend import file_digests

        files = self.library.files()
        for name in list(self.blender.loaded):
            path = files.get(name)
            try:
                gone = path is None or file_digests(path)[0] != self._loaded_sha.get(name)
            except AdapterError:  # replaced by a damaged file: drop it here; loading it again names the file
                gone = True
            # An adapter with learnt trigger words that is not picked now is unloaded: another pick may use the same
            # word, and the Blender refuses two loaded adapters that do (the file stays cached; reloading is cheap).
            if gone or (name not in names and self.blender.loaded[name].adapter.embeddings):
                self.blender.unload(name)
                self._loaded_sha.pop(name, None)
        for name in names:
            if name in self.blender.loaded:
                continue
            path = self.library.path(name)
            self.blender.load(path, name=name)
            self._loaded_sha[name] = file_digests(path)[0]

    def _weights(self, adapters: dict, prompt: str, blocks: dict | None = None) -> tuple[dict, str]:
        """{name: (unet, te) or ``BlockWeight``} for the picked adapters (with their block weights from ``blocks``)
        and the prompt's ``<lora:name:w>`` / ``<lora:name:w:lbw=…>`` tags, and the prompt without its tags. Every
        block vector is parsed here, before the model is touched: a bad one changes nothing. Tag names are looked up
        in the library only, never as paths on the server; the tags come back in the PNG parameters from the blend
        itself."""
        from stylelora.blend import as_pair
        from stylelora.blocks import BlockWeight, parse_blocks, split_weight
        from stylelora.prompt import parse_prompt

        weights = {}
        for n, w in adapters.items():
            name = self.library.find(n)
            plain, vector = split_weight(w, f"weight of {n!r}")  # the Python form (w, "INS") works here too
            pair = as_pair(plain, f"weight of {n!r}")
            weights[name] = BlockWeight(pair, vector) if vector is not None else pair
        for n, text in (blocks or {}).items():
            if text is None or not str(text).strip():
                continue  # an empty editor: every block at 1
            name = self.library.find(n)
            if name not in weights:
                raise ConfigError(f"block weights are given for {name!r}, which is not picked: pick it, or clear "
                                  "its block weights")
            w = weights[name]
            pair = w.weight if isinstance(w, BlockWeight) else w
            weights[name] = BlockWeight(pair, parse_blocks(str(text), f"block weights of {name!r}"))
        clean, refs = parse_prompt(prompt)
        for ref in refs:
            weights[self.library.find(ref.source)] = (BlockWeight(ref.weights, ref.blocks) if ref.blocks is not None
                                                      else ref.weights)
        return weights, clean

    def _block_notes(self, weights: dict) -> list[str]:
        """A line per adapter whose block vector is made for another model family and so zeroes blocks that hold
        some of its modules (allowed, as in A1111, but rarely meant). The adapters are loaded."""
        from stylelora.blocks import FAMILY_LENGTHS, SD_LENGTHS, BlockWeight, unlisted

        notes = []
        expected = FAMILY_LENGTHS.get(self.blender.family or "", SD_LENGTHS)
        for name, w in weights.items():
            if not isinstance(w, BlockWeight) or len(w.blocks.values) in expected:
                continue
            missing = unlisted(self.blender.loaded[name].adapter.modules, w.blocks, self.base.pipe.unet.config)
            if missing:
                notes.append(f"block weights of {name!r}: {len(w.blocks.values)} values, but this "
                             f"{self.blender.family} base takes {' or '.join(str(n) for n in expected)}; blocks "
                             f"{', '.join(missing)} hold some of its layers and get 0")
        return notes

    def _check(self, req: GenerateRequest) -> GenerateRequest:
        from stylelora.generate import SAMPLERS

        if not req.prompt.strip():
            raise ConfigError("write a prompt first")
        if not 1 <= req.num_images <= MAX_IMAGES:
            raise ConfigError(f"number of images must be 1..{MAX_IMAGES}")
        if not 1 <= req.steps <= MAX_STEPS:
            raise ConfigError(f"steps must be 1..{MAX_STEPS}")
        for side in (req.width, req.height):
            if side is not None and not (64 <= side <= MAX_SIDE and side % 8 == 0):
                raise ConfigError(f"width and height must be multiples of 8 between 64 and {MAX_SIDE}, got {side}")
        if req.sampler not in ("default", *SAMPLERS):
            raise ConfigError(f"unknown scheduler {req.sampler!r}")
        seed = int(req.seed)
        return replace(req, seed=secrets.randbelow(2**32) if seed < 0 else seed)

    def _render(self, req: GenerateRequest, weights: dict, prompt: str, seed: int):
        """One image at ``seed`` with ``weights`` fused (the caller holds the lock and synced the adapters)."""
        from stylelora.generate import Settings, generate

        self.blender.set(weights)
        if req.sampler == "default":
            self.base.pipe.scheduler = self._default_scheduler
        settings = Settings(prompt=prompt, negative_prompt=req.negative_prompt, seed=seed, steps=req.steps,
                            guidance=req.guidance, width=req.width, height=req.height,
                            sampler=None if req.sampler == "default" else req.sampler)
        return generate(self.base, settings, self.blender)[0]

    def _save(self, image, seed: int, tag: str = "") -> Path:
        from stylelora.generate import save_png

        return save_png(image, self.outputs / f"{next(self._counter):05d}-{seed}{tag}.png")

    def generate(self, req: GenerateRequest, progress: Progress | None = None) -> GenerateResult:
        """Generate ``num_images`` images (seeds seed, seed+1, …) with the picked adapters at their weights."""
        req = self._check(req)
        weights, prompt = self._weights(req.adapters, req.prompt, req.blocks)
        out, texts = [], []
        self._acquire()
        try:
            self._sync_adapters(weights)
            notes = self._block_notes(weights)
            for i in range(req.num_images):
                if progress:
                    progress(i, req.num_images, f"image {i + 1}/{req.num_images}")
                image = self._render(req, weights, prompt, req.seed + i)
                out.append(self._save(image, req.seed + i))
                texts.append(image.info["parameters"])
        finally:
            self._lock.release()
        self.last_seed = req.seed
        return GenerateResult(out, texts, req.seed, notes)

    def grid(self, req: GridRequest, progress: Progress | None = None) -> GridResult:
        """Sweep one adapter's weight (columns) against seeds or another adapter's weight (rows): one labelled grid."""
        from stylelora.generate import save_png
        from stylelora.grid import image_grid

        settings = self._check(replace(req.settings, num_images=1))
        weights, prompt = self._weights(settings.adapters, settings.prompt, settings.blocks)
        x_name = self.library.find(req.x_adapter)
        if not req.x_values:
            raise ConfigError("give the X weights, e.g. 0, 0.25, 0.5, 0.75, 1")
        y_name = None
        if req.y_kind == "seed":
            ys = [int(v) for v in req.y_values] or [settings.seed]
        elif req.y_kind == "adapter":
            if not req.y_adapter or not req.y_values:
                raise ConfigError("pick the Y adapter and its weights")
            y_name, ys = self.library.find(req.y_adapter), list(req.y_values)
            if y_name == x_name:
                raise ConfigError("X and Y must sweep different adapters")
        elif req.y_kind == "none":
            ys = [None]
        else:
            raise ConfigError(f"unknown Y axis {req.y_kind!r}; use seed, adapter or none")
        total = len(ys) * len(req.x_values)
        if total > MAX_CELLS:
            raise ConfigError(f"the grid would have {total} images; at most {MAX_CELLS}")
        rows, cells, done = [], [], 0
        self._acquire()
        try:
            self._sync_adapters([*weights, x_name, *([y_name] if y_name else [])])
            for y in ys:
                row = []
                for x in req.x_values:
                    if progress:
                        progress(done, total, f"image {done + 1}/{total}")
                    w = {**weights, x_name: _swept(weights.get(x_name), x)}  # a swept adapter keeps its blocks
                    seed = settings.seed
                    if req.y_kind == "adapter":
                        w[y_name] = _swept(weights.get(y_name), y)
                    elif req.y_kind == "seed":
                        seed = y
                    image = self._render(settings, w, prompt, seed)
                    cells.append(self._save(image, seed, "-cell"))
                    row.append(image)
                    done += 1
                rows.append(row)
        finally:
            self._lock.release()
        row_labels = None if req.y_kind == "none" else [
            f"seed {y}" if req.y_kind == "seed" else f"{y_name} {y:g}" for y in ys]
        grid = image_grid(rows, row_labels=row_labels, col_labels=[f"{x_name} {x:g}" for x in req.x_values])
        # only the chosen axis is formatted: with no Y axis, ys is [None] and cannot be formatted as a number
        if req.y_kind == "seed":
            y_text = f"seeds {', '.join(str(y) for y in ys)}"
        elif req.y_kind == "adapter":
            y_text = f"{y_name} weight {', '.join(f'{y:g}' for y in ys)}"
        else:
            y_text = "none"
        info = rows[0][0].info["parameters"] + (f"\nX/Y grid: X {x_name} weight "
                                               f"{', '.join(f'{x:g}' for x in req.x_values)}; Y {y_text}")
        grid.info["parameters"] = info
        path = save_png(grid, self.outputs / f"{next(self._counter):05d}-grid.png")
        self.last_seed = settings.seed
        return GridResult(path, cells, info, settings.seed)

    # ------------------------------------------------------------------------------------------ library
    def adapters(self) -> list[str]:
        return self.library.names()

    def library_rows(self) -> list[list]:
        return [i.row() for i in self.library.entries()]

    def thumbnails(self) -> list[tuple[str, str]]:
        return [(str(i.thumbnail), i.name) for i in self.library.entries() if i.thumbnail]

    def trigger_words(self, names) -> dict[str, str]:
        """{library name: its trigger words} for the picked adapters that have any (metadata or training config)."""
        out = {}
        for n in names or []:
            try:
                name = self.library.find(n)
            except StyleloraError:  # a name typed into the picker that is not (or no longer) in the library
                continue
            trigger = self.library.info(name).trigger
            if trigger:
                out[name] = trigger
        return out

    def adapter_details(self, name: str) -> dict:
        return self.library.details(self.library.find(name))

    def import_adapter(self, upload, name: str | None = None, *, overwrite: bool = False) -> str:
        return self.library.import_file(upload, name or None, pipe=self.base.pipe, overwrite=overwrite)

    def convert_adapter(self, name: str, to: str, new_name: str | None = None, *, overwrite: bool = False) -> str:
        return self.library.convert(self.library.find(name), to, new_name or None, pipe=self.base.pipe,
                                    overwrite=overwrite)

    def merge_adapters(self, weights: dict, new_name: str, *, rank: int | None = None,
                       overwrite: bool = False) -> str:
        from stylelora.blend import as_pair

        pairs = {self.library.find(n): as_pair(w, f"weight of {n!r}") for n, w in weights.items()}
        return self.library.merge(pairs, new_name, rank=rank or None, pipe=self.base.pipe, overwrite=overwrite)

    def resize_adapter(self, name: str, new_name: str | None = None, *, rule: str, value, max_rank=None,
                       measure: bool = False) -> tuple[str, str]:
        """Resize library adapter ``name`` into a new entry by one rule of ``stylelora resize`` (``RESIZE_RULES``:
        rank, energy, ratio, cumulative, budget, max error) with an optional max rank. ``measure`` (always on for
        max error) also reports how far the UNet output moves: it takes the model, so it waits for generation and
        is refused during training. Returns (new name, the per-part table ``stylelora resize`` prints)."""
        name = self.library.find(name)
        kw = resize_rule(rule, value, max_rank)
        try:
            if measure or "max_error" in kw:
                self._acquire()
                try:
                    self.blender.reset()  # measured on the plain base; the next generation re-blends its adapters
                    new, result = self.library.resize(name, new_name or None, pipe=self.base.pipe, measure=self.base,
                                                      **kw)
                finally:
                    self._lock.release()
            else:
                new, result = self.library.resize(name, new_name or None, pipe=self.base.pipe, **kw)
        except ConfigError as e:  # the rule's messages name CLI flags; the page has fields of the same names
            raise ConfigError(_page_words(str(e))) from None
        return new, resize_table(result, self.library.path(name).stat().st_size,
                                 self.library.path(new).stat().st_size)

    def blend_report(self, names, *, sweep: bool = False, weights="0, 0.5, 1", prompt: str = "", steps: int = 20,
                     guidance: float = 5.0, seed: int = 0, weight_each: float = 0.5,
                     threshold: float = 0.3) -> BlendReport:
        """How much the picked library adapters' updates overlap (``stylelora blend-report``): every pair, by block,
        and the suggested block weights for blending them at ``weight_each`` each (``blend-report
        --suggest-blocks``: a block whose overlap reaches ``threshold`` goes to the adapter with the largest energy
        share there), as ``<lora:NAME:W:lbw=…>`` tags with the library names the Generate prompt looks up.
        ``sweep`` (two adapters) also renders the weight-sweep grid on the UI's base (``interference.sweep``: both
        trigger words and ``prompt``, every pair of ``weights``); it takes the model, so it waits for generation
        and is refused during training."""
        import math

        from stylelora.blend import read_adapter
        from stylelora import interference
        from stylelora.cli.blend_report import suggestion

        picked = []
        for n in names or []:
            name = self.library.find(n)
            if name not in picked:
                picked.append(name)
        if len(picked) < 2:
            raise ConfigError("pick two or more adapters to compare")
        try:
            weight_each, threshold = float(weight_each), float(threshold)
        except (TypeError, ValueError):
            raise ConfigError(f"suggested block weights: weight each {weight_each!r} and threshold {threshold!r} "
                              "must be numbers (e.g. 0.5 and 0.3)") from None
        if not (math.isfinite(weight_each) and weight_each > 0):
            raise ConfigError(f"suggested block weights: weight each is {weight_each:g}; give a number above 0 "
                              "(e.g. 0.5, the weight of every picked adapter in the blend)")
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"suggested block weights: threshold is {threshold:g}; give an overlap from 0 to 1 "
                              "(e.g. 0.3: from it a block counts as contested)")
        if sweep:
            if len(picked) != 2:
                raise ConfigError(f"the weight sweep takes two adapters, {len(picked)} are picked: pick two, or "
                                  "untick the sweep for the overlap table of more")
            values = parse_values(weights) if isinstance(weights, str) else [float(w) for w in weights]
            if not values:
                raise ConfigError("give the sweep's weights, e.g. 0, 0.5, 1")
            if len(values) ** 2 > MAX_CELLS:
                raise ConfigError(f"{len(values)} weights make a grid of {len(values) ** 2} images; at most "
                                  f"{MAX_CELLS} ({int(MAX_CELLS ** 0.5)} weights)")
            if not 1 <= int(steps) <= MAX_STEPS:
                raise ConfigError(f"steps must be 1..{MAX_STEPS}")
        adapters = [(name, read_adapter(self.library.path(name), pipe=self.base.pipe)) for name in picked]
        result = interference.report(adapters)
        report = BlendReport(result, report_table(result))
        try:
            report.suggested = suggestion(adapters, {name: weight_each for name in picked}, self.base.pipe.unet.config,
                                          threshold=threshold, metric="input", names={n: n for n in picked})
            report.suggestion = suggestion_markdown(report.suggested)
        except ConfigError as e:  # e.g. adapters of two model families: the overlap table still stands
            report.suggestion = suggestion_markdown(None, str(e))
        if not sweep:
            return report
        from stylelora.generate import save_png

        self._acquire()
        try:
            self.blender.reset()  # the sweep blends on the plain base; the next generation re-blends its adapters
            self.base.pipe.scheduler = self._default_scheduler
            grid, _ = interference.sweep(self.base, adapters, weights=values, prompt=prompt.strip() or None,
                                         steps=int(steps), cfg=float(guidance), seed=int(seed))
        finally:
            self._lock.release()
        grid.info["parameters"] = (f"blend-report weight sweep: rows {picked[0]} weight, columns {picked[1]} weight "
                                   f"({', '.join(f'{v:g}' for v in values)}); prompt: both trigger words, "
                                   f"{prompt.strip() or 'a house by a lake'}; Steps: {int(steps)}, CFG scale: "
                                   f"{float(guidance):g}, Seed: {int(seed)}")
        report.grid = save_png(grid, self.outputs / f"{next(self._counter):05d}-blend-report.png")
        return report

    def delete_adapter(self, name: str) -> str:
        name = self.library.find(name)
        self.library.delete(name)  # the blender drops it at the next generation (_sync_adapters)
        return name

    # ------------------------------------------------------------------------------------------ training
    def image_folders(self) -> list[str]:
        return [str(p) for p in paths.image_folders(self.train_roots)]

    def start_training(self, req: TrainRequest) -> TrainJob:
        """Check the request, then train in a background thread; the adapter joins the library when done."""
        from stylelora.data import scan_folder

        if self.job and self.job.running:
            raise BusyError(f"a training run ({self.job.name!r}) is already going; stop it first")
        name = paths.safe_name(req.name, "adapter name")
        dest = self.library.path(name, must_exist=False)
        if dest.exists() and not req.overwrite:
            raise AdapterError(f"an adapter named {name!r} already exists in the library; choose another name")
        run_dir = self.work_dir / "train" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:  # a refused request leaves no run folder (uploads included) behind
            if req.uploads:
                folder = prepare_uploads(req.uploads, run_dir / "images", max_bytes=self.max_upload_bytes)
            elif req.folder and req.folder.strip():
                folder = paths.within_any(self.train_roots, req.folder, what="image folder")
                if not folder.is_dir():
                    raise paths.UnsafePathError(f"{req.folder!r} is not a folder")
            else:
                raise ConfigError("choose an image folder on the server or upload images")
            reg = None
            if req.reg_folder and req.reg_folder.strip():
                reg = paths.within_any(self.train_roots, req.reg_folder, what="regularization folder")
                if not reg.is_dir():
                    raise paths.UnsafePathError(f"{req.reg_folder!r} is not a folder")
            config = build_config(req, folder, run_dir / f"{name}.safetensors", base=self.base,
                                  native=self.native_size, reg_folder=reg)
            check_slot_fits(config, self.base.pipe)  # the error train() would give at its start, before it starts
            try:
                scan_folder(folder, trigger=config.data.trigger, caption_template=config.data.caption_template,
                            roots=self._scan_roots(folder), skip_bad_images=config.data.skip_bad_images)
            except DataError as e:  # name the files as the user knows them, never the server's upload folder
                raise DataError(_hide_folder(str(e), folder)) from None
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return self._launch(name, config, recipe=req.preset, overwrite=req.overwrite)

    def _launch(self, name: str, config, *, recipe: str, overwrite: bool) -> TrainJob:
        """Start ``config`` in the background; the adapter it writes joins the library as ``name``."""
        self.library.reserve(name)  # until the run ends: the library's own actions cannot take the name
        # the page shows the recipe without the server's work folder (uploads and the working adapter live there)
        work = str(self.work_dir)
        shown = config.replace(output=f"{name}.safetensors", **(
            {"folder": "(uploaded images)"} if config.data.folder.startswith(work) else {}))
        self.job = TrainJob(name, config, run=self._train_locked, samples_dir=self.work_dir / "samples",
                            recipe=recipe, shown_config=shown, on_done=lambda out: self._keep_trained(out, name, overwrite),
                            on_end=lambda: self.library.release(name)).start()
        self.job.overwrite = overwrite
        return self.job

    def _stopped_job(self) -> TrainJob:
        if self.job is None or self.job.running or self.job.status()["status"] != "stopped":
            raise ConfigError("there is no stopped training run (Stop a run first)")
        return self.job

    def save_stopped(self) -> TrainJob:
        """Write what the stopped run learnt into the library as ``NAME-step-N``: the run resumes from its stop
        checkpoint with ``steps = N``, so no step is taken and the adapter is written by training's own save path
        (metadata, learnt tokens, final samples). The stopped run can still be resumed afterwards."""
        from stylelora import checkpoint

        job = self._stopped_job()
        saved = checkpoint.list_checkpoints(checkpoint.checkpoint_root(Path(job.config.run.output)))
        if not saved:
            raise ConfigError(f"the stopped run {job.name!r} left no checkpoint to save from")
        step = int(checkpoint.NAME.match(saved[-1].name).group(1))
        config = job.config.replace(steps=step, resume="latest", sample_every=0, save_every=0)
        self._resumable = job  # "Resume" continues the original run, not this save
        return self._launch(f"{job.name}-step-{step}", config, recipe=job.recipe, overwrite=False)

    def resume_stopped(self) -> TrainJob:
        """Continue the last stopped run (or the run a save was made from) from its newest checkpoint."""
        job = self.job
        if job is not None and not job.running and job.status()["status"] == "done" \
                and getattr(self, "_resumable", None) is not None:
            job = self._resumable  # the save finished: resume the run it was saved from
        elif job is not None and not job.running and job.status()["status"] == "stopped":
            pass
        else:
            raise ConfigError("there is no stopped training run to resume")
        self._resumable = None
        return self._launch(job.name, job.config.replace(resume="latest"), recipe=job.recipe,
                            overwrite=getattr(job, "overwrite", False))

    def _scan_roots(self, folder, reg_folder: str | None = None) -> list[Path]:
        """Where a training folder's files may resolve to: the training roots, or the upload folder itself; with
        ``reg_folder`` "toy:plain" (the tiny-scaled presets' default) also the toy world's own plain pictures, which
        live under $STYLELORA_HOME, outside every training root (refused there, every preset run on ``tiny``
        failed at step 0)."""
        from stylelora.presets import TOY_PLAIN

        extra = []
        if reg_folder == TOY_PLAIN:
            from stylelora.toy.world import plain_folder

            extra.append(plain_folder())
        return [*self.train_roots, Path(folder), *extra]

    def _train_locked(self, config, progress, should_stop) -> Path:
        import stylelora
        from stylelora.data import confined_to

        roots = self._scan_roots(config.data.folder, config.data.reg_folder)
        with self._lock, confined_to(roots):  # train()'s own scan is confined too
            self.blender.reset()  # train on the plain base, not on today's blend
            pipe = self.base.pipe
            placement = {n: (m.device, m.dtype) for n, m in _parts(pipe).items()}
            try:
                return stylelora.train(config, base=self.base, progress=progress, should_stop=should_stop,
                                       on_data=lambda summary: progress({"dataset": summary}))
            except BaseException:
                _give_back(pipe, placement)  # whatever went wrong, the next generation gets the plain base
                raise

    def _keep_trained(self, output: Path, name: str, overwrite: bool) -> str:
        return self.library.keep_trained(output, name, overwrite=overwrite)  # a free name if it was taken

    def stop_training(self) -> str:
        if not (self.job and self.job.running):
            return "no training is running"
        self.job.stop()
        return "stopping after the current step…"

    def training_status(self) -> dict | None:
        return self.job.status() if self.job else None


def _swept(current, value: float):
    """A grid axis's weight ``value`` for an adapter whose weight now is ``current``: both weights ``value``, its
    block vector (if it has one) kept."""
    from stylelora.blocks import BlockWeight

    pair = (float(value), float(value))
    return BlockWeight(pair, current.blocks) if isinstance(current, BlockWeight) else pair


def _hide_folder(message: str, folder: Path) -> str:
    """``message`` with the dataset folder's server path taken out of the file names it mentions."""
    for f in {str(folder), str(Path(folder).resolve())}:
        message = message.replace(f + "/", "").replace(f, "the image folder")
    return message


def _parts(pipe) -> dict:
    return {n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipe, n, None) is not None}


def _give_back(pipe, placement: dict) -> None:
    """Remove LoRA layers a failed training run left in ``pipe`` and put its parts back where they were."""
    from peft.tuners.lora import LoraLayer

    from stylelora.lora import remove

    names = {n for m in _parts(pipe).values() for _, layer in m.named_modules() if isinstance(layer, LoraLayer)
             for n in layer.lora_A}
    for name in names:
        remove(pipe, name)
    for n, (device, dtype) in placement.items():
        getattr(pipe, n).to(device, dtype)
        getattr(pipe, n).requires_grad_(False)


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
