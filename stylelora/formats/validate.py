"""Checks on LoRA tensors; every error names the file and the key."""

from __future__ import annotations

import math
import re

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
    if len(target) < 2:
        raise AdapterError(f"{file}: {key}: module {module_path} is a norm layer (weight {list(target)}); a LoRA pair "
                           f"cannot change it (LyCORIS norm modules use w_norm/b_norm)")
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


# ------------------------------------------------------------------------------------------ token embeddings
# characters a prompt word cannot hold: separators, A1111 attention/LoRA syntax, and the dot A1111 splits
# bundle_emb keys at
_BAD_WORD = re.compile(r"[\s.,:;()\[\]{}|\\\"']")


def _width_owner(width: int) -> str:
    """Which released text encoders have token embeddings this wide, for messages."""
    from .arch import ARCHS

    owners = [f"{label} {te}" for label, _, tes in ARCHS.values() for te, (_, cfg) in tes.items()
              if cfg["hidden_size"] == width]
    return f" (the width of {' and '.join(owners)})" if owners else ""


def check_word(file, key: str, word: str) -> None:
    if not word or _BAD_WORD.search(word):
        raise AdapterError(f"{file}: {key}: {word!r} cannot be an embedding's trigger word: it must be one word, "
                           "without spaces, dots, commas, colons, quotes, parentheses or brackets")


def check_embedding(file, emb, keys: dict[str, str], widths: dict[str, int] | None = None, where: str = "") -> None:
    """A learnt token embedding: valid word, ``[num_tokens, width]`` float finite tensors per text encoder, the same
    token count in each, and (when the model is known, ``widths``) the text encoder's width. ``keys`` names the
    file key (or a description) of each component's tensor."""
    first = next(iter(keys.values()), emb.name)
    check_word(file, first, emb.name)
    if not emb.vectors:
        raise AdapterError(f"{file}: embedding {emb.name!r} has no vectors")
    counts = {}
    for comp, t in emb.vectors.items():
        key = keys.get(comp, f"embedding {emb.name} ({comp})")
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise AdapterError(f"{file}: {key} has shape {list(t.shape)}; an embedding is [num_tokens, width]")
        if not t.is_floating_point():
            raise AdapterError(f"{file}: {key} has dtype {t.dtype}; embeddings must be floating point")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{file}: {key} contains NaN or inf values")
        if widths is not None and comp not in widths:
            raise AdapterError(f"{file}: {key} is for {comp}, which {where or 'the model'} does not have")
        if widths and t.shape[1] != widths[comp]:
            raise AdapterError(
                f"{file}: {key} has width {t.shape[1]}{_width_owner(int(t.shape[1]))} but {comp} of "
                f"{where or 'the model'} takes {widths[comp]}{_width_owner(widths[comp])}. The embedding was "
                "made for a different model.")
        counts[key] = int(t.shape[0])
    if len(set(counts.values())) > 1:
        raise AdapterError(f"{file}: embedding {emb.name!r} has different token counts per text encoder: "
                           + ", ".join(f"{k} {n}" for k, n in counts.items()))
    if widths and len(widths) > 1 and set(emb.vectors) != set(widths):
        missing = sorted(set(widths) - set(emb.vectors))
        raise AdapterError(f"{file}: embedding {emb.name!r} ({first}) has no vectors for {', '.join(missing)}; "
                           f"{where or 'the model'} has {len(widths)} text encoders and needs one per encoder")
