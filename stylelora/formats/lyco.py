"""Reading LyCORIS (LoHa, LoKr, LoCon with ``lora_mid``), full-difference and DoRA modules into ``LycoModule``.

Which roles make which type, and the checks every file passes before anything is computed: every factor present,
floating point and finite, the factors multiply (checked on the meta device, so no memory is spent), the product
fits the layer, and a ``dora_scale`` lies on the layer's output or input axis. Errors name the file and the key.
The ΔW rules themselves are ``adapter.LycoModule``'s; the facts and their sources are in docs/formats.md.
"""

from __future__ import annotations

import math

import torch

from ..adapter import LycoModule
from ..errors import AdapterError
from .keys import LYCO_ROLES, Group

# type -> (roles it needs, roles it may have); "lokr" is checked by hand (w1 or w1_a/b, w2 or w2_a/b)
_KINDS = {
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2"}),
    "tucker": ({"down", "up", "mid"}, set()),
    "full": ({"diff"}, {"diff_b"}),
    "norm": ({"w_norm"}, {"b_norm"}),
    "lora": ({"down", "up"}, set()),
}
NAMES = {"loha": "LoHa", "lokr": "LoKr", "tucker": "LoCon (Tucker, lora_mid)", "full": "full difference",
         "norm": "norm-layer difference", "lora": "LoRA"}
_COMMON = {"alpha", "dora_scale"}


def is_lyco(group: Group) -> bool:
    """Whether a module's keys are not a plain LoRA pair (any LyCORIS, diff or DoRA role)."""
    return any(role in group.keys for role in LYCO_ROLES)


def kind_of(file, group: Group) -> str:
    roles = set(group.keys)
    where = _where(group)
    if any(r.startswith("lokr_") for r in roles):
        kind = "lokr"
        for n in ("1", "2"):
            if f"lokr_w{n}" not in roles and not {f"lokr_w{n}_a", f"lokr_w{n}_b"} <= roles:
                raise AdapterError(f"{file}: {where}: LoKr module has no lokr_w{n} (nor both lokr_w{n}_a and "
                                   f"lokr_w{n}_b): {_listing(group)}")
        allowed = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    elif any(r.startswith("hada_") for r in roles):
        kind = "loha"
    elif "mid" in roles:
        kind = "tucker"
    elif "diff" in roles or "diff_b" in roles:
        kind = "full"
    elif "w_norm" in roles or "b_norm" in roles:
        kind = "norm"
    elif "down" in roles or "up" in roles:
        kind = "lora"
    else:
        raise AdapterError(f"{file}: {where}: {_listing(group)} without the factors it belongs to "
                           "(a DoRA dora_scale needs a LoRA/LyCORIS module on the same layer)")
    if kind != "lokr":
        need, may = _KINDS[kind]
        missing = sorted(need - roles)
        if missing:
            raise AdapterError(f"{file}: {where}: {NAMES[kind]} module is missing "
                               f"{', '.join(_key(group, m) for m in missing)} (has {_listing(group)})")
        allowed = need | may
    extra = sorted(roles - allowed - _COMMON)
    if extra:
        raise AdapterError(f"{file}: {where}: {', '.join(group.keys[r] for r in extra)} cannot go with a "
                           f"{NAMES[kind]} module on the same layer (has {_listing(group)})")
    return kind


def _key(group: Group, role: str) -> str:
    """The file key a missing role would have (named in errors)."""
    from .keys import role_suffix

    some = next(iter(group.keys.values()))
    stem = some[: -len(role_suffix(next(iter(group.keys))))] if group.slot.flat else None
    return (stem + role_suffix(role)) if stem else role


def first_key(group: Group) -> str:
    """The key errors name for a module: its first factor (not its alpha)."""
    return sorted(k for r, k in group.keys.items() if r != "alpha")[0] if len(group.keys) > 1 or \
        "alpha" not in group.keys else group.keys["alpha"]


def _where(group: Group) -> str:
    return f"module {group.slot.name}"


def _listing(group: Group) -> str:
    return ", ".join(sorted(group.keys.values()))


def _checked(file, group: Group, tensors) -> dict[str, torch.Tensor]:
    out = {}
    for role, key in group.keys.items():
        if role == "alpha":
            continue
        t = tensors[key]
        if not t.is_floating_point():
            raise AdapterError(f"{file}: {key} has dtype {t.dtype}; adapter weights must be floating point")
        if t.numel() == 0:
            raise AdapterError(f"{file}: {key} is empty (shape {list(t.shape)})")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{file}: {key} contains NaN or inf values")
        out[role] = t
    return out


def raw_shape(file, group: Group, tensors) -> tuple[int, ...]:
    """The shape of ΔW as the factors give it (before reshaping to the layer): checks that they multiply."""
    kind = kind_of(file, group)
    checked = _checked(file, group, tensors)
    meta = {r: torch.empty(t.shape, device="meta") for r, t in checked.items()
            if r not in ("dora_scale", "diff_b", "b_norm")}
    try:
        shape = tuple(LycoModule(kind, meta, None, ()).base_delta().shape)
    except (RuntimeError, IndexError, ValueError):
        shape = ()
    if not shape or (kind == "lokr" and not _lokr_dims_ok(meta)):
        shapes = ", ".join(f"{group.keys[r]} {list(t.shape)}" for r, t in sorted(checked.items()))
        raise AdapterError(f"{file}: {_where(group)}: the {NAMES[kind]} factors do not fit together: {shapes}")
    return shape


def _lokr_dims_ok(meta: dict) -> bool:
    w1 = meta.get("lokr_w1")
    return w1 is None or w1.dim() == 2


def build(file, group: Group, tensors, raw: tuple[int, ...], target: tuple[int, ...], module_path: str,
          hint: str = "") -> LycoModule:
    """The module for a layer whose weight has shape ``target`` (checked against ``raw``, the factors' product)."""
    kind = kind_of(file, group)
    checked = _checked(file, group, tensors)
    first = first_key(group)
    fits = tuple(raw) == tuple(target) or (raw[0] == target[0] and math.prod(raw) == math.prod(target))
    if not fits:
        raise AdapterError(f"{file}: {first}: the {NAMES[kind]} module makes a weight update of shape {list(raw)}, "
                           f"which does not fit module {module_path} (weight {list(target)}). The adapter was made "
                           f"for a different model{hint}.")
    for role in ("diff_b", "b_norm"):
        if role in checked and tuple(checked[role].shape) != (target[0],):
            raise AdapterError(f"{file}: {group.keys[role]} has shape {list(checked[role].shape)}; the bias of "
                               f"module {module_path} has {target[0]} values")
    axis = None
    if "dora_scale" in checked:
        axis = dora_axis(file, group.keys["dora_scale"], checked["dora_scale"], target)
    alpha = None
    if "alpha" in group.keys:
        from .validate import alpha_from_tensor

        alpha = alpha_from_tensor(file, group.keys["alpha"], tensors[group.keys["alpha"]])
    return LycoModule(kind, checked, alpha, tuple(target), axis)


def dora_axis(file, key: str, t: torch.Tensor, target: tuple[int, ...]) -> str:
    """"out" for one magnitude per output row ([out], [out, 1(, 1, 1)]: PEFT, LyCORIS' default), "in" for one per
    input column ([1, in(, 1, 1)]: kohya sd-scripts, OneTrainer, what A1111 reads): decided from the shape."""
    if len(target) < 2:
        raise AdapterError(f"{file}: {key}: a DoRA magnitude on a layer with a 1-D weight {list(target)} (a norm layer)"
                           " means nothing; DoRA rescales the rows or columns of a Linear/Conv weight")
    out, inp = target[0], target[1]
    shape = tuple(t.shape)
    if t.dim() == 1 and shape[0] == out:
        return "out"
    if t.dim() >= 2 and shape[0] == out and all(d == 1 for d in shape[1:]):
        return "out"
    if t.dim() >= 2 and shape[0] == 1 and shape[1] == inp and all(d == 1 for d in shape[2:]):
        return "in"
    raise AdapterError(f"{file}: {key} has shape {list(shape)}, which is neither a per-output magnitude [{out}, 1] "
                       f"(PEFT/LyCORIS) nor a per-input one [1, {inp}] (kohya/OneTrainer) for a weight of shape "
                       f"{list(target)}")
