"""Training from the web UI: presets (recipes of stylelora/presets.py), a request checked before anything starts,
and a job in a background thread.

The job calls ``stylelora.training.train`` on the UI's own base (no second base is loaded) and keeps the latest
progress in a dict that the page polls. The adapter is written in the work folder and copied into the library
only when training finished, so a stopped or failed run leaves the library untouched.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from stylelora.config import SCHEDULERS
from stylelora.errors import ConfigError, StyleloraError, TrainingCancelled
from stylelora.presets import WEBUI, WEBUI_DEFAULT, for_base

from . import paths

log = logging.getLogger(__name__)


PRESETS = WEBUI  # quick / standard / thorough: recipes of stylelora/presets.py


@dataclass
class TrainRequest:
    """What the Train tab sends. ``folder`` is a server folder inside a training root; ``uploads`` are files."""

    name: str
    folder: str | None = None
    uploads: list[str] = field(default_factory=list)  # images, captions and/or .zip archives
    trigger: str = ""
    preset: str = WEBUI_DEFAULT
    steps: int | None = None  # overrides of the preset (None or 0: the preset's value)
    rank: int | None = None
    lr: float | None = None
    resolution: int | None = None  # None: the base's native size (at most 1024)
    sample_every: int | None = None  # None: 4 sample rounds per run; 0: none
    sample_steps: int = 20
    seed: int = 0
    overwrite: bool = False
    train_tokens: int | None = None  # learnt trigger tokens (pivotal tuning); None: the preset's value, 0: off
    # more overrides of the preset; None: the preset's value
    train_text_encoder: bool | None = None
    te_lr: float | None = None  # None or 0: the UNet's learning rate
    batch_size: int | None = None
    alpha: float | None = None  # None or 0: alpha = rank
    caption_dropout: float | None = None
    lr_scheduler: str | None = None
    reg_folder: str | None = None  # a server folder inside a training root (checked by the Studio)
    sample_prompts: str = ""  # one per line; empty: the trigger word
    skip_bad_images: bool = False
    slot: int | None = None  # orthogonal slot (train --slot K); None: off


def prepare_uploads(files: list[str], dest: Path, *, max_bytes: int) -> Path:
    """Put uploaded images, captions and zip contents into ``dest`` (a fresh folder); refuses anything else.

    ``max_bytes`` (the UI's --max-upload-mb) bounds each uploaded file and also everything written into ``dest``
    together, archives unpacked included: a few KB of zip cannot fill the disk. A refused upload leaves nothing.
    """
    try:
        return _prepare_uploads(files, dest, max_bytes)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _prepare_uploads(files: list[str], dest: Path, max_bytes: int) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    count, left = 0, max_bytes
    for f in files:
        f = Path(f)
        name = paths.upload_name(f.name)
        suffix = f.suffix.lower()
        size = paths.check_size(f, max_bytes, name)
        if suffix == ".zip":
            written = paths.extract_images(f, dest, max_bytes=left)
            left -= sum(p.stat().st_size for p in written)
            count += sum(p.suffix.lower() in paths.IMAGE_SUFFIXES for p in written)
        elif suffix in paths.IMAGE_SUFFIXES + paths.CAPTION_SUFFIXES:
            if size > left:
                raise paths.UploadError(f"the upload is more than {max_bytes / 2**20:.0f} MiB in all (the "
                                        "--max-upload-mb limit); upload fewer or smaller files")
            shutil.copyfile(f, dest / name)
            left -= size
            count += suffix in paths.IMAGE_SUFFIXES
        else:
            raise paths.UploadError(f"{name}: upload images ({', '.join(paths.IMAGE_SUFFIXES)}), same-name .txt "
                                    "captions, or a .zip of them")
    if count == 0:
        raise paths.UploadError("the upload holds no images")
    return dest


# Bounds of what a browser may ask for: a web request must not be able to hang the server (resolution 2^31
# never finishes building its buckets) or keep the one model busy for days. The command line and TOML are
# checked by the config itself; these are the UI's own, tighter, limits.
MAX_STEPS = 100_000
MAX_RANK = 256
MAX_SAMPLE_STEPS = 150
MAX_BATCH = 64


def max_resolution(native: int) -> int:
    """The largest training resolution the UI offers: twice the base's native size, and at least 1024."""
    return max(1024, 2 * int(native)) // 64 * 64


def check_request(req: TrainRequest, *, native: int) -> None:
    """Refuse settings outside what the base and the UI support, with the allowed range in the message."""
    import math

    def whole(value, what: str, lo: int, hi: int) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value) or not lo <= value <= hi:
            raise ConfigError(f"{what} must be a whole number from {lo} to {hi}, got {value!r}")

    top = max_resolution(native)
    whole(req.steps or None, "steps", 1, MAX_STEPS)
    whole(req.rank or None, "rank", 1, MAX_RANK)
    whole(req.resolution or None, "resolution", 64, top)
    if req.resolution and int(req.resolution) % 64:
        raise ConfigError(f"resolution must be a multiple of 64 (64 … {top}), got {req.resolution}")
    whole(req.sample_every, "sample every (steps between samples; 0 = never)", 0, MAX_STEPS)
    whole(req.sample_steps, "sample denoising steps", 1, MAX_SAMPLE_STEPS)
    whole(req.train_tokens, "learnt trigger tokens (0 = off)", 0, 64)
    whole(req.seed, "seed", 0, 2**32 - 1)
    whole(req.batch_size or None, "batch size", 1, MAX_BATCH)
    whole(req.slot, "orthogonal slot (empty = off)", 0, 1023)  # TrainConfig's own range (--slot)
    for value, what, top in ((req.te_lr, "text-encoder learning rate", 1), (req.alpha, "alpha", 4 * MAX_RANK)):
        if value not in (None, 0) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                       or not math.isfinite(value) or not 0 < value <= top):
            raise ConfigError(f"{what} must be a number above 0 and at most {top}, got {value!r}")
    if req.caption_dropout is not None and (not isinstance(req.caption_dropout, (int, float))
                                            or not 0 <= req.caption_dropout < 1):
        raise ConfigError(f"caption dropout must be from 0 to below 1, got {req.caption_dropout!r}")
    if req.lr_scheduler not in (None, "", *SCHEDULERS):
        raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {req.lr_scheduler!r}")
    if req.lr not in (None, 0) and (not isinstance(req.lr, (int, float)) or not math.isfinite(req.lr)
                               or not 0 < req.lr <= 1):
        raise ConfigError(f"learning rate must be a number above 0 and at most 1, got {req.lr!r}")


def build_config(req: TrainRequest, folder: Path, output: Path, *, base, native: int,
                 reg_folder: Path | None = None):
    """The ``TrainConfig`` for a request: the preset's recipe, then the request's overrides. ``reg_folder``: the
    checked server path of ``req.reg_folder``."""
    if req.preset not in PRESETS:
        raise ConfigError(f"unknown preset {req.preset!r}; choose one of {', '.join(PRESETS)}")
    check_request(req, native=native)
    # on the toy `tiny` base: the tiny-scaled numbers
    recipe = for_base(PRESETS[req.preset], base.spec, trigger=bool(req.trigger.strip()))
    steps = int(req.steps or recipe["steps"])
    resolution = int(req.resolution or max(64, min(1024, native) // 64 * 64))
    sample_every = max(1, steps // 4) if req.sample_every is None else int(req.sample_every)
    dtype = str(getattr(base.pipe.unet, "dtype", "float32"))
    precision = "fp16" if "float16" in dtype and "bfloat" not in dtype else "bf16" if "bfloat16" in dtype else "no"
    return recipe.config(
        folder=str(folder), trigger=req.trigger.strip() or None, resolution=resolution,
        rank=int(req.rank or recipe["rank"]), lr=float(req.lr or recipe["lr"]),
        base=base.spec, output=str(output), steps=steps, seed=int(req.seed), sample_every=sample_every,
        sample_steps=int(req.sample_steps), mixed_precision=precision, log_every=max(1, min(10, steps // 50)),
        checkpoint_every=0,
        train_tokens=int(recipe["train_tokens"] if req.train_tokens is None else req.train_tokens),
        **_extras(req, recipe, reg_folder),
    )


def _extras(req: TrainRequest, recipe, reg_folder: Path | None) -> dict:
    """The request's optional overrides (text encoder, batch, alpha, dropout, scheduler, reg images, samples)."""
    te = recipe["train_text_encoder"] if req.train_text_encoder is None else bool(req.train_text_encoder)
    out = {"train_text_encoder": te, "skip_bad_images": bool(req.skip_bad_images),
           "sample_prompts": [x.strip() for x in (req.sample_prompts or "").splitlines() if x.strip()]}
    if req.te_lr:
        out["te_lr"] = float(req.te_lr)
    if req.batch_size:
        out["batch_size"] = int(req.batch_size)
    if req.alpha:
        out["alpha"] = float(req.alpha)
    if req.caption_dropout is not None:
        out["caption_dropout"] = float(req.caption_dropout)
    if req.lr_scheduler:
        out["lr_scheduler"] = req.lr_scheduler
    if reg_folder is not None:
        out["reg_folder"] = str(reg_folder)
    if req.slot is not None:
        out["slot"] = int(req.slot)
    return out


def check_slot_fits(config, pipe) -> None:
    """Refuse an orthogonal slot that does not fit a layer the run would train, before the run starts, with the
    error ``train`` gives at its start (``orthogonal.slot_rows`` names the layer and the slots that fit): a slot
    K at rank r needs (K+1)·r input dimensions in every layer. The layers are the ones PEFT would wrap for the
    config's targets (``check_target_module_exists``, the test ``LoraConfig`` itself uses)."""
    net = config.network
    if net.slot is None:
        return
    import math

    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from stylelora.lora import components
    from stylelora.orthogonal import slot_rows
    from stylelora.quantize import weight_shape

    for comp, module in components(pipe).items():
        targets = net.unet_targets if comp == "unet" else net.te_targets if net.train_text_encoder else []
        if not targets:
            continue
        peft_config = LoraConfig(r=net.rank, target_modules=list(targets))
        for path, layer in module.named_modules():
            shape = weight_shape(layer) if path and check_target_module_exists(peft_config, path) else None
            if shape is not None and len(shape) >= 2 and (net.slot + 1) * net.rank > math.prod(shape[1:]):
                slot_rows(f"{comp}.{path}", math.prod(shape[1:]), net.rank, net.slot)  # raises, naming the layer


class TrainJob:
    """One training run in a background thread; ``status()`` is what the page shows."""

    def __init__(self, name: str, config, *, run, on_done, on_end=None, samples_dir: Path | None = None,
                 recipe: str = "default", shown_config=None):
        self.name = name
        self.config = config
        self.recipe = recipe
        self._run = run  # callable(config, progress, should_stop) -> Path of the written adapter
        self._on_done = on_done  # callable(Path) -> library name, called when training finished
        self._on_end = on_end  # callable(), called however the run ends (e.g. to release the reserved name)
        # Sample images are copied here for the page: the run folder (working adapter, checkpoints, uploads) is
        # never served, and its name (in the samples' paths) is not shown either.
        self._samples_dir = Path(samples_dir) if samples_dir is not None else None
        self._published = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state = {"name": name, "status": "starting", "step": 0, "steps": config.run.steps, "loss": None,
                       "lr": None, "elapsed": 0.0, "eta": None, "samples": [], "message": "waiting for the model",
                       "adapter": None, "recipe": (shown_config or config).summary(recipe), "dataset": None, "losses": []}
        self._started = time.time()
        self.thread = threading.Thread(target=self._main, name=f"train-{name}", daemon=True)

    def start(self) -> "TrainJob":
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._update(message="stopping after the current step…")

    def join(self, timeout: float | None = None) -> dict:
        self.thread.join(timeout)
        return self.status()

    def status(self) -> dict:
        with self._lock:
            s = dict(self._state)
            s["samples"] = list(s["samples"])
            s["losses"] = list(s["losses"])
        if s["status"] in ("starting", "running"):
            s["elapsed"] = time.time() - self._started
        return s

    def _update(self, **kw) -> None:
        with self._lock:
            self._state.update(kw)

    def _progress(self, p: dict) -> None:
        with self._lock:
            st = self._state
            st["status"] = "running"
            st["step"], st["steps"] = p.get("step", st["step"]), p.get("steps", st["steps"])
            for k in ("loss", "lr", "eta"):
                if k in p:  # sample-only reports carry no loss
                    st[k] = p[k]
            if isinstance(p.get("loss"), (int, float)):  # the loss plot's points
                st["losses"] = st["losses"] + [(st["step"], float(p["loss"]))]
            if p.get("sample"):
                st["samples"] = st["samples"] + [str(self._publish(Path(x))) for x in p["sample"]]
            st["message"] = f"step {st['step']}/{st['steps']}"

    def _report(self, p: dict) -> None:
        """What ``run`` reports: ``{"dataset": DatasetSummary}`` once, after the scan and before the base is
        prepared; then training's own progress events."""
        if "dataset" in p:
            self._update(dataset=p["dataset"].format())
        else:
            self._progress(p)

    def _publish(self, sample: Path) -> Path:
        """The copy of a sample image the page may show (the sample itself without a samples folder)."""
        if self._samples_dir is None:
            return sample
        self._samples_dir.mkdir(parents=True, exist_ok=True)
        self._published += 1
        out = self._samples_dir / f"{self.name}-{secrets.token_hex(4)}-{self._published:04d}{sample.suffix}"
        shutil.copyfile(sample, out)
        return out

    def _main(self) -> None:
        try:
            self._update(status="running", message="preparing images and caches…")
            output = self._run(self.config, self._report, self._stop.is_set)
            output = Path(output)
            finals = sorted(output.parent.glob(f"{output.stem}-samples/step-{self.config.run.steps:06d}-*.png"))
            name = self._on_done(Path(output))
            shown = [str(self._publish(p)) for p in finals]
            with self._lock:
                self._state["samples"] = self._state["samples"] + shown
            message = f"done: {name} is in the library"
            if name != self.name:
                message += f" (the name {self.name!r} was taken during the run, so it was saved as {name!r})"
            self._update(status="done", adapter=name, step=self.config.run.steps, eta=0.0,
                         elapsed=time.time() - self._started, message=message)
        except TrainingCancelled:
            self._update(status="stopped", elapsed=time.time() - self._started,
                         message=f"stopped at step {self.status()['step']}; nothing was added to the library yet: "
                                 "'Save what was learnt so far' adds it as an adapter, 'Resume' continues the run")
        except StyleloraError as e:
            self._update(status="failed", message=str(e), elapsed=time.time() - self._started)
        except Exception as e:  # noqa: BLE001 - the page shows a message; the log keeps the traceback
            log.exception("training %s failed", self.name)
            self._update(status="failed", message=f"training failed: {type(e).__name__}: {e}",
                         elapsed=time.time() - self._started)
        finally:
            if self._on_end is not None:
                self._on_end()


def format_status(s: dict | None) -> str:
    """The progress line the page shows (Markdown)."""
    if not s:
        return "No training has run in this session."
    loss = f"{s['loss']:.4f}" if isinstance(s.get("loss"), (int, float)) else "-"
    eta = _duration(s["eta"]) if isinstance(s.get("eta"), (int, float)) else "-"
    head = {"starting": "Starting", "running": "Training", "done": "Finished", "stopped": "Stopped",
            "failed": "Failed"}.get(s["status"], s["status"])
    text = (f"**{head}** `{s['name']}` · step {s['step']}/{s['steps']} · loss {loss} · elapsed "
            f"{_duration(s.get('elapsed') or 0)} · ETA {eta}\n\n{s.get('message') or ''}")
    blocks = [b for b in (s.get("recipe"), s.get("dataset")) if b]
    if blocks:  # the effective recipe and the dataset summary, as the CLI prints them
        text += "\n\n```\n" + "\n".join(blocks) + "\n```"
    return text


def loss_frame(s: dict | None):
    """The loss plot's data: one row per logged step (the progress events' average loss since the last log)."""
    import pandas as pd  # gradio's own dependency; imported here so that importing this module stays light

    return pd.DataFrame((s or {}).get("losses") or [], columns=["step", "loss"])


def sample_caption(path: str) -> str:
    """The caption shown beside a sample image: its prompt, read from the PNG's A1111 ``parameters`` chunk."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            text = str(img.info.get("parameters") or "")
    except OSError:
        text = ""
    prompt = text.split("\n", 1)[0].strip()
    return prompt or Path(path).name


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
