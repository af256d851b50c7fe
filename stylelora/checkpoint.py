"""Resumable training checkpoints: LoRA parameters, optimizer, LR scheduler, grad scaler, step.

A checkpoint is a folder ``step-000120`` written under a temporary name and renamed into place, so a run killed
mid-write leaves either the previous checkpoints or a complete new one, never a torn one. Everything random in
training is derived from (seed, step), so restoring these states is enough for a resumed run to end bit-for-bit
where an uninterrupted one ends.

``state.json`` (written last) records the size and sha256 of the other two files, so a checkpoint damaged later
(a truncated copy, a bad disk) is recognised before anything is loaded: ``--resume latest`` then falls back to the
newest intact checkpoint, saying so, and a damaged one named explicitly is refused with the previous one offered.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import manifest
from .atomic import atomic_folder
from .errors import TrainingError
from .tensorfile import check_torch_archive, read_safetensors

NAME = re.compile(r"^step-(\d{6,})$")
# Settings that may differ between the first run and its resume (they do not change the trained tensors).
RESUMABLE_CHANGES = {"run.steps", "run.resume", "run.checkpoint_every", "run.keep_checkpoints", "run.save_every", "run.sample_every",
                     "run.sample_prompts", "run.sample_steps", "run.sample_seed", "run.log_every",
                     "run.tensorboard_dir", "run.output", "run.format", "data.cache_dir", "data.skip_bad_images"}
FILES = ("lora.safetensors", "train_state.pt")  # what state.json's "files" describes

log = logging.getLogger(__name__)


def checkpoint_root(output: Path) -> Path:
    return output.parent / f"{output.stem}-checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def save(root: Path, step: int, *, params: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
         state: dict, keep: int, extra: dict | None = None) -> Path:
    """Write ``root/step-NNNNNN`` atomically, then delete all but the newest ``keep``. ``extra``: more tensors
    and plain values for ``train_state.pt`` (e.g. AdaLoRA's allocator state)."""
    final = root / f"step-{step:06d}"
    with atomic_folder(final, fsync=True) as tmp:  # durable: resuming relies on the newest checkpoint
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "lora.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, **(extra or {})},
                   tmp / "train_state.pt")
        files = manifest.record(tmp, FILES)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "files": files}, indent=1, sort_keys=True))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def damage(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (None if it is intact): its state.json does not parse, or a
    file is missing or differs in size or sha256 from what state.json recorded when it was written."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"state.json is unreadable ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "state.json is not a checkpoint's state"
    files = state.get("files")
    if not isinstance(files, dict):  # written before checksums were recorded: only presence can be checked
        missing = [name for name in FILES if not (path / name).is_file()]
        return f"{', '.join(missing)} missing" if missing else None
    return manifest.damage(path, files, FILES)


def _previous_intact(path: Path) -> Path | None:
    """The newest intact checkpoint older than ``path`` in its folder."""
    match = NAME.match(path.name)
    older = [p for p in list_checkpoints(path.parent)
             if match is None or int(NAME.match(p.name).group(1)) < int(match.group(1))]
    return next((p for p in reversed(older) if damage(p) is None), None)


def _damaged_error(path: Path, why: str) -> TrainingError:
    prev = _previous_intact(path)
    offer = (f"The previous intact checkpoint is {prev}: resume from it with --resume {prev} (or delete {path} "
             "and use --resume latest)." if prev else "No older intact checkpoint exists; start the run again "
             "without --resume.")
    return TrainingError(f"checkpoint {path} is damaged: {why}. {offer}")


def find(resume: str, root: Path) -> Path | None:
    """Resolve ``--resume``: 'latest' → newest intact checkpoint in ``root`` (None if there is none; damaged newer
    ones are skipped with a warning naming them); a folder → that folder, refused with the previous intact one
    offered if it is damaged."""
    if resume == "latest":
        for path in reversed(list_checkpoints(root)):
            why = damage(path)
            if why is None:
                return path
            log.warning("checkpoint %s is damaged (%s); falling back to an older one", path, why)
        return None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise TrainingError(f"--resume {resume}: not a checkpoint folder (no state.json). "
                            f"Use 'latest' or a folder such as {root}/step-000100.")
    why = damage(path)
    if why is not None:
        raise _damaged_error(path, why)
    return path


def load(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(state.json, LoRA params, optimizer/scheduler/scaler states). Pickled parts load with weights_only=True.

    A damaged checkpoint raises ``TrainingError`` naming it and the previous intact one."""
    why = damage(path)
    if why is not None:
        raise _damaged_error(path, why)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    state.pop("files", None)  # this module's bookkeeping, not part of the run's state
    try:
        params, _ = read_safetensors(path / "lora.safetensors", error=TrainingError)
    except TrainingError as e:
        raise _damaged_error(path, str(e)) from None
    try:
        check_torch_archive(path / "train_state.pt", error=TrainingError)
        train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/UnpicklingError/EOFError for a bad archive
        raise _damaged_error(path, f"train_state.pt cannot be loaded ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return state, params, train_state


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted config keys that differ between a checkpoint's run and this one, ignoring harmless ones."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            dotted = f"{section}.{key}"
            if dotted not in RESUMABLE_CHANGES and a.get(key) != b.get(key):
                diffs.append(f"{dotted}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


# ------------------------------------------------------------------------------ into and out of a live run
def trainable_state(accelerator, models: dict) -> dict[str, torch.Tensor]:
    """Trainable (LoRA) parameters by ``component.name``, from the unwrapped models."""
    return {f"{comp}.{name}": p for comp, model in models.items()
            for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


def restore(path: Path, run_state: dict, accelerator, models, optimizer, lr_scheduler) -> int:
    """Load a checkpoint into the live run after checking it belongs to the same run; returns its step."""
    state, params, train_state = load(path)
    # a setting added since the checkpoint was written (e.g. train_tokens) counts as its default, which is how
    # that older run trained
    from .config import TrainConfig

    defaults = TrainConfig().to_dict()
    saved_config = {sec: {**defaults.get(sec, {}), **values} for sec, values in state["config"].items()}
    diffs = config_differences(saved_config, run_state["config"])
    if diffs:
        raise TrainingError(f"cannot resume from {path}: the run's settings changed: {'; '.join(diffs)}. "
                            "Use the original settings (or start a new run with a different output).")
    if state["data"] != run_state["data"]:
        raise TrainingError(f"cannot resume from {path}: the training images or captions changed since it was "
                            "written. Restore them, or start a new run.")
    if state["world"] != run_state["world"]:
        raise TrainingError(f"cannot resume from {path}: it was written by {state['world']} process(es), this run "
                            f"has {run_state['world']}. Launch with the same number of processes.")
    live = trainable_state(accelerator, models)
    if set(live) != set(params):
        raise TrainingError(f"cannot resume from {path}: its LoRA parameters do not match this run's")
    with torch.no_grad():
        for k, p in live.items():
            p.copy_(params[k])
    optimizer.load_state_dict(train_state["optimizer"])
    lr_scheduler.load_state_dict(train_state["lr_scheduler"])
    if accelerator.scaler is not None and train_state.get("scaler"):
        accelerator.scaler.load_state_dict(train_state["scaler"])
    return int(state["step"])
