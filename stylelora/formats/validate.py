"""Checks on LoRA tensors; every error names the file and the key."""

from __future__ import annotations

import math

import torch

from ..adapter import LoraModule
from ..errors import AdapterError
from ..models import Family, compatible
from .keys import FAMILY_NAMES


def check_pair(file, key_down: str, down: torch.Tensor, key_up: str, up: torch.Tensor) -> None:
    """down [r, in(, kh, kw)] and up [out, r(, 1, 1)]: same rank, float, finite."""
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise AdapterError(f"{file}: {key_down} has shape {list(down.shape)} and {key_up} has shape "
                           f"{list(up.shape)}; expected a 2-D (Linear) or 4-D (conv) pair")
    if down.shape[0] != up.shape[1]:
        raise AdapterError(f"{file}: rank mismatch: {key_down} has rank {down.shape[0]} (shape {list(down.shape)}) "
                           f"but {key_up} has rank {up.shape[1]} (shape {list(up.shape)})")
    if down.shape[0] == 0:
        raise AdapterError(f"{file}: {key_down} has rank 0")
    if down.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise AdapterError(f"{file}: {key_up} has shape {list(up.shape)}; a conv LoRA up weight must be 1x1")
    for key, t in ((key_down, down), (key_up, up)):
        if not t.is_floating_point():
            raise AdapterError(f"{file}: {key} has dtype {t.dtype}; LoRA weights must be floating point")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{file}: {key} contains NaN or inf values")


def check_alpha(file, key: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise AdapterError(f"{file}: {key}: alpha must be a finite number > 0, got {value}")
    return float(value)


def alpha_from_tensor(file, key: str, t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise AdapterError(f"{file}: {key} should hold one number (alpha) but has shape {list(t.shape)}")
    return check_alpha(file, key, float(t.detach().float().reshape(()).item()))


def fit_shape(file, key: str, module_path: str, m: LoraModule, target: tuple[int, ...], hint: str = "") -> LoraModule:
    """Check the pair against the target layer's weight shape; a 1x1 conv pair on a Linear layer (or the reverse,
    as SD1 vs SD2 ``proj_in`` differ) is reshaped to the layer's layout."""
    down, up = m.down, m.up
    kernel = tuple(target[2:])
    if len(target) == 2 and down.dim() == 4 and tuple(down.shape[2:]) == (1, 1):
        down, up = down.flatten(1), up.flatten(1)
    elif kernel == (1, 1) and down.dim() == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    want_down = (m.rank, target[1], *kernel)
    want_up = (target[0], m.rank) + ((1, 1) if kernel else ())
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise AdapterError(
            f"{file}: {key}: LoRA shapes down {list(m.down.shape)} / up {list(m.up.shape)} do not fit module "
            f"{module_path} (weight {list(target)}; expected down {list(want_down)}, up {list(want_up)}). "
            f"The adapter was made for a different model{hint}."
        )
    if down is m.down:
        return m
    return LoraModule(down=down, up=up, alpha=m.alpha)


def check_family(file, found: str | None, why: str, target: Family, target_desc: str) -> None:
    """An adapter for SDXL does not go on SD1.x, and so on (SD2 vs SD2-v only differ in prediction: allowed)."""
    if compatible(found, target.key):
        return
    raise AdapterError(
        f"{file}: this adapter is for {FAMILY_NAMES[found]} ({why}), but {target_desc} is "
        f"{FAMILY_NAMES[target.key]}. Use it with a {FAMILY_NAMES[found]} base model."
    )


def short_list(keys, limit: int = 8) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
