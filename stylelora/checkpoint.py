"""Resumable training checkpoints: LoRA parameters, optimizer, LR scheduler, grad scaler, step.

A checkpoint is a folder ``step-000120`` written under a temporary name and renamed into place, so a run killed
mid-write leaves either the previous checkpoints or a complete new one, never a torn one. Everything random in
training is derived from (seed, step), so restoring these states is enough for a resumed run to end bit-for-bit
where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_folder
from .errors import TrainingError
from .tensorfile import read_safetensors

NAME = re.compile(r"^step-(\d{6,})$")
# Settings that may differ between the first run and its resume (they do not change the trained tensors).
RESUMABLE_CHANGES = {"run.steps", "run.resume", "run.checkpoint_every", "run.keep_checkpoints", "run.sample_every",
                     "run.sample_prompts", "run.sample_steps", "run.sample_seed", "run.log_every",
                     "run.tensorboard_dir", "run.output", "run.format", "data.cache_dir", "data.skip_bad_images"}


def checkpoint_root(output: Path) -> Path:
    return output.parent / f"{output.stem}-checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def save(root: Path, step: int, *, params: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler,
         state: dict, keep: int) -> Path:
    """Write ``root/step-NNNNNN`` atomically, then delete all but the newest ``keep``."""
    final = root / f"step-{step:06d}"
    with atomic_folder(final, fsync=True) as tmp:  # durable: resuming relies on the newest checkpoint
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "lora.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1, sort_keys=True))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find(resume: str, root: Path) -> Path | None:
    """Resolve ``--resume``: 'latest' → newest complete checkpoint in ``root`` (None if there is none)."""
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise TrainingError(f"--resume {resume}: not a checkpoint folder (no state.json). "
                            f"Use 'latest' or a folder such as {root}/step-000100.")
    return path


def load(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(state.json, LoRA params, optimizer/scheduler/scaler states). Pickled parts load with weights_only=True."""
    state = json.loads((path / "state.json").read_text())
    params, _ = read_safetensors(path / "lora.safetensors", error=TrainingError)
    train_state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
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
