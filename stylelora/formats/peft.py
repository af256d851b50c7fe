"""The PEFT / diffusers layout: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.…``.

Alpha lives in the header, as diffusers' own ``save_lora_weights`` writes it: metadata key
``lora_adapter_metadata`` holds JSON of the ``LoraConfig`` fields per component, flattened with a
``<component>.`` prefix (``{"unet.r": 8, "unet.lora_alpha": 4.0, "unet.target_modules": [...], ...}``).
``pipe.load_lora_weights(file)`` builds each component's ``LoraConfig`` from it, so the scale is right.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import torch

from ..adapter import Adapter, LoraModule, LycoModule
from ..errors import AdapterError
from .arch import ArchTable, peft_name

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def _target(component: str, path: str) -> str:
    """The name PEFT matches (exactly, or as a dotted suffix). For CLIP, without ``text_model.`` so it matches
    both the flattened (transformers 5) and the nested module names."""
    return path if component == "unet" else path.removeprefix("text_model.")


def _most_common(values):
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -v))


def to_state_dict(adapter: Adapter, table: ArchTable | None) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, value of ``lora_adapter_metadata``)."""
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, object] = {}
    _check_peft_modules(adapter)
    for comp in adapter.components():
        mods = {p: _pair(m) for p, m in adapter.modules[comp].items()}
        dora = {p for p, m in adapter.modules[comp].items() if isinstance(m, LycoModule)}
        for path, m in mods.items():
            name = f"{comp}.{peft_name(comp, path, table)}"
            tensors[f"{name}.lora_A.weight"] = m.down.detach().cpu().contiguous()
            tensors[f"{name}.lora_B.weight"] = m.up.detach().cpu().contiguous()
            if path in dora:  # PEFT's save drops the ".weight" of the DoRA magnitude (one value per output row)
                scale = adapter.modules[comp][path].tensors["dora_scale"]
                tensors[f"{name}.lora_magnitude_vector"] = scale.detach().cpu().reshape(-1).contiguous()
        if dora and len(dora) != len(mods):  # PEFT's use_dora holds for a whole LoraConfig
            raise AdapterError(f"{comp}: PEFT's use_dora is one setting per component, and only some modules have a "
                               "DoRA magnitude: write the kohya layout")
        if dora:
            config[f"{comp}.use_dora"] = True
        r = int(_most_common(m.rank for m in mods.values()))
        alpha = float(_most_common(float(m.alpha) for m in mods.values()))
        targets = {path: _target(comp, peft_name(comp, path, table)) for path in mods}
        config.update({
            f"{comp}.r": r,
            f"{comp}.lora_alpha": alpha,
            f"{comp}.target_modules": sorted(targets.values()),
            f"{comp}.rank_pattern": {targets[p]: m.rank for p, m in sorted(mods.items()) if m.rank != r},
            f"{comp}.alpha_pattern": {targets[p]: float(m.alpha) for p, m in sorted(mods.items())
                                      if float(m.alpha) != alpha},
        })
    return tensors, json.dumps(config, indent=2, sort_keys=True)


def _check_peft_modules(adapter: Adapter) -> None:
    """PEFT's layout holds LoRA pairs, and DoRA pairs with the magnitude per output row; anything else is refused."""
    for comp in adapter.components():
        for path, m in adapter.modules[comp].items():
            if not isinstance(m, LycoModule):
                continue
            if m.kind != "lora" or not m.dora:
                raise AdapterError("the PEFT layout holds LoRA (and DoRA) pairs only, and this adapter has LyCORIS / "
                                   "full-difference modules: write the kohya layout, or a plain LoRA (stylelora "
                                   "convert --to lora)")
            if m.dora_axis != "out":
                raise AdapterError(f"{comp}.{path}: the DoRA magnitude is per input column ([1, in], kohya/A1111 "
                                   "layout), and PEFT's lora_magnitude_vector is per output row; the two are not "
                                   "convertible: write the kohya layout, or train with --dora-layout out")


def _pair(m):
    """The LoRA pair of a module (a ``LoraModule``, or the down/up/alpha of a DoRA ``LycoModule``)."""
    if isinstance(m, LycoModule):
        return LoraModule(down=m.tensors["down"], up=m.tensors["up"], alpha=float(m.alpha if m.alpha is not None
                                                                                   else m.rank))
    return m


def read_configs(file, metadata: dict[str, str]) -> dict[str, dict]:
    """Per component, the ``LoraConfig`` fields stored in ``lora_adapter_metadata`` (empty if absent)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
        if not isinstance(flat, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise AdapterError(f"{file}: metadata key {METADATA_KEY} is not valid JSON ({e})") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        if field:
            out.setdefault(comp, {})[field] = value
    for comp, cfg in out.items():
        for field in ("alpha_pattern", "rank_pattern"):
            patterns = cfg.get(field) or {}
            if not isinstance(patterns, dict):
                raise AdapterError(f"{file}: metadata key {METADATA_KEY}: {comp}.{field} is not a JSON object")
            for pattern in patterns:
                _check_pattern(file, f"{comp}.{field}", pattern)
    return out


# PEFT reads alpha_pattern / rank_pattern keys as regular expressions over module names. Files come from anyone, and
# a crafted pattern such as "(.*){14}!" backtracks for hours, so only what real files use is accepted: module names
# (dots plain or escaped), "^"/"$" anchors and a few ".*" wildcards — a pattern language in which matching a ~100-character
# module name takes microseconds. The checker itself is linear: its alternatives start with different characters.
_SAFE_PATTERN = re.compile(r"\^?(?:[\w\-]|\\\.|\.\*?)*\$?")
_MAX_PATTERN, _MAX_WILDCARDS = 512, 4


def _check_pattern(file, where: str, pattern) -> None:
    if not isinstance(pattern, str) or len(pattern) > _MAX_PATTERN or not _SAFE_PATTERN.fullmatch(pattern) \
            or pattern.count("*") > _MAX_WILDCARDS:
        shown = repr(pattern)[:80]
        raise AdapterError(f"{file}: metadata key {METADATA_KEY}: {where} key {shown} is not a module name "
                           "pattern stylelora accepts (module names, '^'/'$' and up to four '.*' wildcards; "
                           "diffusers writes plain module names). Rewrite that entry with the module's name.")


def _matches(pattern: str, name: str) -> bool:
    # PEFT's rule (peft.utils.other.get_pattern_key): the pattern matches a dotted suffix of the name. Patterns are
    # checked by _check_pattern when the file is read, so this regex cannot backtrack badly.
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def alpha_from_config(file, cfg: dict, names: list[str], rank: int) -> float:
    """The alpha PEFT would use for a module (``alpha_pattern`` first, rsLoRA folded in), as scale · rank."""
    try:
        alpha = float(cfg.get("lora_alpha", rank))
        for pattern, value in (cfg.get("alpha_pattern") or {}).items():
            if any(_matches(pattern, n) for n in names):
                alpha = float(value)
                break
    except (TypeError, ValueError):
        raise AdapterError(f"{file}: metadata key {METADATA_KEY}: lora_alpha / alpha_pattern are not numbers") from None
    if cfg.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); as alpha' / r that is alpha' = alpha · sqrt(r)
        alpha *= math.sqrt(rank)
    return alpha
