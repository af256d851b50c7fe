"""Recognising the key layouts of LoRA files (kohya, PEFT, older diffusers) and what they say about the model family.

Parsing only splits a key into (component, module name as spelled in the file, role); which live module that
name means is decided by the module table in ``arch.py``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from ..models import FAMILIES, family_with_component

FAMILY_NAMES = {key: spec.name for key, spec in FAMILIES.items()}

# kohya key prefix -> component, over every family's prefixes (lora_te is SD1/SD2's, lora_te1/lora_te2 SDXL's)
KOHYA_COMPONENTS = {prefix: comp for spec in FAMILIES.values() for comp, prefix in spec.kohya_prefixes}
# LyCORIS / DoRA / full-difference tensors a module may hold besides (or instead of) a LoRA pair; the role is the
# suffix itself (docs/formats.md, "LyCORIS files", says which tool writes and reads each)
LYCO_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
              "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
              "mid", "diff", "diff_b", "w_norm", "b_norm", "dora_scale")
_LYCO_SUFFIX = {"mid": "lora_mid.weight"}  # role -> key suffix where they differ
_KOHYA_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
               **{_LYCO_SUFFIX.get(r, r): r for r in LYCO_ROLES}}
_KOHYA = re.compile(r"^(%s)_(.+)\.(%s)$"
                    % ("|".join(sorted(KOHYA_COMPONENTS, key=len, reverse=True)),  # lora_te1 before lora_te
                       "|".join(re.escape(s) for s in sorted(_KOHYA_ROLE, key=len, reverse=True))))


def role_suffix(role: str) -> str:
    """The key suffix (after the module name) a kohya-layout file uses for ``role``."""
    return {v: k for k, v in _KOHYA_ROLE.items()}[role]

# dotted suffix -> (role, style); the last two only after an old attention-processor name (``to_q_lora``)
_DOTTED = (
    (".lora_A.weight", "down", "peft"), (".lora_B.weight", "up", "peft"),
    (".lora.down.weight", "down", "diffusers"), (".lora.up.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers"), (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".alpha", "alpha", None),
    # PEFT's DoRA magnitude (one value per output row; save_pretrained drops the ".weight")
    (".lora_magnitude_vector.weight", "dora_scale", None), (".lora_magnitude_vector", "dora_scale", None),
    (".down.weight", "down", "diffusers-old"), (".up.weight", "up", "diffusers-old"),
)
# old diffusers attention processors: name -> (UNet module, CLIP module)
_OLD_PROC = {"to_q_lora": ("to_q", "q_proj"), "to_k_lora": ("to_k", "k_proj"), "to_v_lora": ("to_v", "v_proj"),
             "to_out_lora": ("to_out.0", "out_proj")}
_DOTTED_COMPONENTS = ("unet", "text_encoder_2", "text_encoder")

# Adapter types we know and do not read (OFT/BOFT, GLoRA, (IA)^3, LoRA biases): a file holding them is refused as
# a whole, never loaded in part
_UNSUPPORTED = re.compile(r"oft_blocks|oft_diag|\.oft_R|\.on_input$|\.(a1|a2|b1|b2)\.weight$|"
                          r"\.(lora_B|lora_up)\.bias$")


@dataclass(frozen=True)
class Slot:
    """One module as a file names it."""

    component: str  # unet | text_encoder | text_encoder_2
    name: str  # kohya: the part after "lora_unet_"; dotted layouts: the module path as spelled
    flat: bool  # kohya (underscored) name


@dataclass
class Group:
    slot: Slot
    keys: dict[str, str] = field(default_factory=dict)  # role (down/up/alpha) -> file key
    style: str | None = None


@dataclass
class ParsedKeys:
    groups: dict[Slot, Group] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    unrecognized: list[str] = field(default_factory=list)
    styles: Counter = field(default_factory=Counter)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # two keys for one role of one module

    @property
    def layout(self) -> str:
        """kohya | peft | diffusers | diffusers-old | mixed | none."""
        styles = [s for s in self.styles if s]
        return styles[0] if len(styles) == 1 else ("mixed" if styles else "none")


def _dotted(key: str) -> tuple[str, str, str, str | None] | None:
    """(component, module spelling, role, style) of a dotted key, or None."""
    key = key.removeprefix("base_model.model.")  # PEFT's own save_pretrained of a single model
    comp, rest = None, key
    for c in _DOTTED_COMPONENTS:
        if key.startswith(c + "."):
            comp, rest = c, key[len(c) + 1:]
            break
    if comp is None:  # bare keys: old diffusers UNet attention processors, or a text encoder's own names
        comp = "text_encoder" if key.startswith("text_model.") else "unet"
    for suffix, role, style in _DOTTED:
        if not rest.endswith(suffix):
            continue
        module = rest[: -len(suffix)]
        parent, _, last = module.rpartition(".")
        if last in _OLD_PROC:
            mapped = _OLD_PROC[last][0 if comp == "unet" else 1]
            parent = parent.removesuffix(".processor")
            return comp, f"{parent}.{mapped}" if parent else mapped, role, "diffusers-old"
        if style == "diffusers-old" or not module:
            return None
        return comp, module, role, style
    return None


def parse_keys(keys) -> ParsedKeys:
    out = ParsedKeys()
    for key in keys:
        if _UNSUPPORTED.search(key):
            out.unsupported.append(key)
            continue
        m = _KOHYA.match(key)
        if m:
            slot, role, style = Slot(KOHYA_COMPONENTS[m.group(1)], m.group(2), True), _KOHYA_ROLE[m.group(3)], "kohya"
        else:
            parsed = _dotted(key)
            if parsed is None:
                out.unrecognized.append(key)
                continue
            comp, module, role, style = parsed
            slot = Slot(comp, module, False)
        group = out.groups.setdefault(slot, Group(slot))
        if role in group.keys:
            out.duplicates.append((group.keys[role], key))
        group.keys[role] = key
        if style:
            group.style = style
            out.styles[style] += 1
    return out


# ---------------------------------------------------------------------------------------------- families
_SS_VERSION = {spec.ss_base_model_version: key for key, spec in FAMILIES.items()}
_SS_PREFIX = {spec.ss_version_prefix: key for key, spec in FAMILIES.items() if spec.ss_version_prefix}
_MODELSPEC = sorted(((spec.modelspec_match, key) for key, spec in FAMILIES.items()), key=lambda m: -len(m[0]))
_CROSS_DIM: dict[int, str] = {}
for _key, _spec in FAMILIES.items():  # sd2 and sd2-v share a width: the first row (epsilon) answers
    _CROSS_DIM.setdefault(_spec.cross_attention_dim, _key)
# the kohya prefix of a text encoder beyond the first, which only families with several have (lora_te2 -> sdxl).
# lora_te1 is no evidence: diffusers' convert_state_dict_to_kohya writes lora_te1_ for the (first) text encoder of
# every family, SD1 and SD2 included, and diffusers loads those files on SD1/SD2.
_SECOND_TE = {prefix: key for key, spec in FAMILIES.items() if len(spec.text_encoders) > 1
              for comp, prefix in spec.kohya_prefixes if comp not in ("unet", "text_encoder")}


def family_from_metadata(md: dict[str, str]) -> tuple[str | None, str]:
    """(family key, where it was read) from stylelora, kohya or ModelSpec metadata."""
    if md.get("stylelora.family") in FAMILY_NAMES:
        return md["stylelora.family"], f"metadata stylelora.family={md['stylelora.family']}"
    version = md.get("ss_base_model_version", "")
    found = _SS_VERSION.get(version) or next((k for p, k in _SS_PREFIX.items() if version.startswith(p)), None)
    if found:
        return found, f"metadata ss_base_model_version={version}"
    arch = md.get("modelspec.architecture", "")
    for prefix, fam in _MODELSPEC:
        if arch.startswith(prefix):
            return fam, f"metadata modelspec.architecture={arch}"
    if md.get("ss_v2") == "True":
        return next(k for k, spec in FAMILIES.items() if spec.ss_v2), "metadata ss_v2=True"
    return None, ""


def input_width(group: Group, shape_of) -> int | None:
    """The input width of the layer a module's tensors are for (any adapter type), or None if they do not say."""
    k = group.keys
    if "down" in k:
        return _dim(shape_of(k["down"]), 1)
    if "diff" in k:
        return _dim(shape_of(k["diff"]), 1)
    if "hada_w1_b" in k:
        return _dim(shape_of(k["hada_w1_b"]), 1)
    w1 = _dim(shape_of(k["lokr_w1"]), 1) if "lokr_w1" in k else (
        _dim(shape_of(k["lokr_w1_b"]), 1) if "lokr_w1_b" in k else None)
    w2 = _dim(shape_of(k["lokr_w2"]), 1) if "lokr_w2" in k else (
        _dim(shape_of(k["lokr_w2_b"]), 1) if "lokr_w2_b" in k else None)
    return w1 * w2 if w1 and w2 else None


def _dim(shape, i: int) -> int | None:
    return int(shape[i]) if len(shape) > i else None


def family_from_keys(keys, parsed: ParsedKeys, shape_of) -> tuple[str | None, str]:
    """(family key, evidence) from a second text encoder's keys (SDXL), else the UNet's cross-attention width.

    The text-encoder prefix alone never says SDXL: ``lora_te1_`` is what diffusers' kohya converter writes for SD1
    and SD2 too, so only a second encoder (``lora_te2_``, ``text_encoder_2.``, clip_g embeddings) does."""
    second_te = sorted({p for k in keys for p in _SECOND_TE if k.startswith(p + "_")})
    if second_te:
        return _SECOND_TE[second_te[0]], f"{second_te[0]}_ keys (a second text encoder)"
    second = family_with_component("text_encoder_2")
    if second and any(k.startswith("text_encoder_2.") for k in keys):
        return second.key, "text_encoder_2 keys"
    if second and any(k.startswith("bundle_emb.") and k.endswith(".clip_g") or
                      k.startswith("stylelora_emb.") and k.endswith(".text_encoder_2") for k in keys):
        return second.key, "embedding vectors for a second text encoder (clip_g)"
    for slot, group in parsed.groups.items():
        sep = "_" if slot.flat else "."
        if slot.component == "unet" and (f"attn2{sep}to_k" in slot.name or f"attn2{sep}to_v" in slot.name):
            width = input_width(group, shape_of)
            if width in _CROSS_DIM:
                return _CROSS_DIM[width], f"cross-attention width {width}"
    # UNet names: only SDXL (of the released families) stacks more than one transformer block per attention
    # (SD1/SD2: transformer_blocks.0 only; SDXL: 2 and 10)
    deep = next((s.name for s in parsed.groups if s.component == "unet" and _DEEP.search(s.name)), None)
    if deep and second:
        return second.key, f"UNet module {deep} (a transformer depth only SDXL has)"
    return None, ""


_DEEP = re.compile(r"transformer_blocks[._]([1-9]\d*)[._]")


def tiny_spec(md: dict[str, str]) -> str | None:
    """The built-in SD1-layout base (``tiny`` or ``tiny-random``) an adapter was trained on, from its metadata, or
    None. Their module tables differ from SD1.5's and from each other's."""
    import json

    try:
        base = json.loads(md.get("stylelora.config", "{}")).get("run", {}).get("base")
    except (ValueError, AttributeError):
        base = None
    if base not in ("tiny", "tiny-random") and "stylelora.version" in md:
        base = md.get("ss_sd_model_name")
    return base if base in ("tiny", "tiny-random") else None
