"""Module tables: which LoRA-able modules a model has, and every name a file may give each of them.

A table is built from ``named_modules()`` of a live model, or of the real architecture built on the meta device
(no weights) for SD1.5, SD2.x and SDXL. Reading maps a file's key to a module by dictionary lookup in the table,
never by repairing underscores. The names a module gets are:

- its live path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``);
- for the UNet, its ldm/sgm path (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``, from ``ldm.ldm_unet_path``),
  which kohya uses for the families whose row says ``unet_naming="ldm"`` (SDXL);
- for CLIP, the ``text_model.``-prefixed path older transformers used (newer ones flatten ``CLIPTextModel``);
- the kohya spelling of each of these: dots become underscores (``lora_unet_`` + that).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace

import torch

from ..errors import AdapterError
from ..ldm import ldm_unet_path
from ..models import Family

# ---------------------------------------------------------------------------------- reference architectures
# diffusers UNet2DConditionModel / transformers CLIP configs of the released models (only what shapes depend on).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)

# arch -> (display name, UNet config, {text-encoder component: (transformers class name, config)}): the released
# model of each module layout (FAMILIES rows with the same arch share it)
ARCHS = {
    "sd1": ("SD1.5", SD15_UNET, {"text_encoder": ("CLIPTextModel", CLIP_L)}),
    "sd2": ("SD2.x", SD2_UNET, {"text_encoder": ("CLIPTextModel", OPENCLIP_H)}),
    "sdxl": ("SDXL", SDXL_UNET, {"text_encoder": ("CLIPTextModel", CLIP_L),
                                 "text_encoder_2": ("CLIPTextModelWithProjection", OPENCLIP_BIGG)}),
}

_CLIP_TOP = ("embeddings.", "encoder.", "final_layer_norm")


def te_canonical_path(path: str) -> str:
    """The ``text_model.``-prefixed CLIP path kohya and older transformers use (newer ones flatten CLIPTextModel)."""
    return "text_model." + path if path.startswith(_CLIP_TOP) else path


# --------------------------------------------------------------------------------------------- the tables
@dataclass
class ComponentTable:
    """One component's LoRA-able modules and the names files give them."""

    name: str  # unet | text_encoder | text_encoder_2
    shapes: dict[str, tuple[int, ...]]  # live module path -> weight shape
    dotted: dict[str, str] = field(default_factory=dict)  # every accepted dotted spelling -> live path
    flat: dict[str, str] = field(default_factory=dict)  # every accepted kohya name (after "lora_xx_") -> live path
    ambiguous: set[str] = field(default_factory=set)  # kohya names that two modules would share
    kohya_out: dict[str, str] = field(default_factory=dict)  # live path -> kohya name written
    peft_out: dict[str, str] = field(default_factory=dict)  # live path -> dotted name written
    # GroupNorm/LayerNorm paths -> weight shape: only LyCORIS norm modules (w_norm/b_norm) go there, not LoRA
    norms: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def resolve(self, name: str, flat: bool) -> str | None:
        return (self.flat if flat else self.dotted).get(name)

    def weight_shape(self, path: str) -> tuple[int, ...]:
        return self.shapes[path] if path in self.shapes else self.norms[path]


@dataclass
class ArchTable:
    family: Family | None
    components: dict[str, ComponentTable]
    source: str  # for messages: "the base model", "the built-in SD1.5 architecture", ...


def build_component(name: str, shapes: dict[str, tuple[int, ...]], unet_config=None,
                    ldm: bool = False, norms: dict[str, tuple[int, ...]] | None = None) -> ComponentTable:
    """Index every spelling of every module (and of the ``norms`` layers); ``ldm`` makes the written kohya UNet
    names ldm (SDXL)."""
    table = ComponentTable(name, dict(shapes), norms=dict(norms or {}))
    for path in [*shapes, *table.norms]:
        if name == "unet":
            alt = ldm_unet_path(path, unet_config) if unet_config is not None else None
            spellings = [path] + ([alt] if alt else [])
            table.kohya_out[path] = (alt if ldm else path) if (alt or not ldm) else None
            table.peft_out[path] = path
        else:
            canon = te_canonical_path(path)
            spellings = list(dict.fromkeys([path, canon, path.removeprefix("text_model.")]))
            table.kohya_out[path] = canon
            table.peft_out[path] = canon
        for s in spellings:
            table.dotted.setdefault(s, path)
            flat = s.replace(".", "_")
            if table.flat.get(flat, path) != path:
                table.ambiguous.add(flat)
            table.flat[flat] = path
    return table


def lora_targets(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Live paths and weight shapes of the Linear/Conv2d modules (PEFT-wrapped ones by their own path)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        BaseTunerLayer = ()  # noqa: N806
    out: dict[str, tuple[int, ...]] = {}
    skip = None  # named_modules() is pre-order: a wrapper's children follow it directly
    for name, mod in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        skip = None
        if BaseTunerLayer and isinstance(mod, BaseTunerLayer):
            out[name] = tuple(mod.get_base_layer().weight.shape)
            skip = name + "."
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name] = tuple(mod.weight.shape)
    return out


def norm_targets(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Live paths and weight shapes of the GroupNorm/LayerNorm layers with a weight (LyCORIS ``w_norm`` targets)."""
    return {name: tuple(mod.weight.shape) for name, mod in model.named_modules()
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and getattr(mod, "weight", None) is not None}


def _component(name: str, model: torch.nn.Module, unet_config=None, ldm: bool = False) -> ComponentTable:
    return build_component(name, lora_targets(model), unet_config, ldm=ldm, norms=norm_targets(model))


def _ldm_names(family: Family | None) -> bool:
    """Whether kohya spells this family's UNet modules with ldm (sgm) names (SDXL) rather than diffusers ones."""
    return family is not None and family.spec.unet_naming == "ldm"


def table_from_pipe(pipe, family: Family) -> ArchTable:
    """The table of a loaded pipeline (its UNet and text encoders)."""
    comps = {"unet": _component("unet", pipe.unet, pipe.unet.config, ldm=_ldm_names(family))}
    for te in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, te, None)
        if model is not None:
            comps[te] = _component(te, model)
    return ArchTable(family, comps, "the base model")


@functools.lru_cache(maxsize=8)
def builtin_table(arch: str, tiny: str | None = None) -> ArchTable:
    """The table of a released architecture (or of the built-in base named ``tiny``), built on the meta device."""
    from diffusers import UNet2DConditionModel
    import transformers

    if tiny:
        from ..models import ensure_tiny

        # the tiny base's own saved configs (whatever builds it), instantiated without weights
        folder = ensure_tiny(tiny)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            te = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        models = {"unet": unet, "text_encoder": te}
        label, unet_cfg = tiny, unet.config
    else:
        label, unet_cfg, tes = ARCHS[arch]
        with torch.device("meta"):
            models = {"unet": UNet2DConditionModel(**unet_cfg)}
            for te, (cls_name, cfg) in tes.items():
                cls = getattr(transformers, cls_name)
                models[te] = cls(transformers.CLIPTextConfig(max_position_embeddings=77, vocab_size=49408, **cfg))
    comps = {
        name: _component(name, m, unet_cfg if name == "unet" else None, ldm=_ldm_names(Family(arch)))
        for name, m in models.items()
    }
    return ArchTable(Family(arch), comps, f"the built-in {label} architecture")


def kohya_name(component: str, path: str, prefixes: dict[str, str], table: ArchTable | None,
               family: Family | None) -> str:
    """The kohya module name written for a live path (``lora_unet_...``), without a tensor suffix."""
    comp = table.components.get(component) if table else None
    if comp is not None and path in comp.kohya_out:
        name = comp.kohya_out[path]
    elif component == "unet":
        # no table: the released model's block layout numbers the ldm blocks
        name = ldm_unet_path(path, ARCHS[family.arch][1]) if _ldm_names(family) else path
    else:
        name = te_canonical_path(path)
    if name is None:
        raise AdapterError(f"UNet module {path!r} has no ldm (sgm) name, which kohya's "
                           f"{family.spec.name if family else ''} layout needs")
    return prefixes[component] + "_" + name.replace(".", "_")


def peft_name(component: str, path: str, table: ArchTable | None) -> str:
    comp = table.components.get(component) if table else None
    if comp is not None and path in comp.peft_out:
        return comp.peft_out[path]
    return path if component == "unet" else te_canonical_path(path)


# ------------------------------------------------------------------------------------- tables from a file alone
def _fitting(table: ArchTable, modules) -> int:
    """How many (slot, down shape, up shape) resolve to one module of ``table`` whose weight they fit (a 1x1 conv
    pair fits a Linear layer and the reverse, as ``validate.fit_shape`` reshapes them)."""
    count = 0
    for slot, down, up in modules:
        comp = table.components.get(slot.component)
        live = comp.resolve(slot.name, slot.flat) if comp else None
        if live is None or live not in comp.shapes or (slot.flat and slot.name in comp.ambiguous):
            continue
        target = comp.shapes[live]
        kernels = {tuple(down[2:]), tuple(target[2:])}
        flat_conv = len(down) == 2 and len(target) == 4 and down[1] == math.prod(target[1:])  # LoHa/LoKr convs
        count += len(down) >= 2 and target[0] == up[0] and (flat_conv or target[1] == down[1] and (
            len(kernels) == 1 or kernels == {(), (1, 1)}))
    return count


def _numbers(pattern: str, names) -> list[tuple[int, ...]]:
    rx = re.compile(pattern)
    return [tuple(int(g) for g in m.groups()) for n in names if (m := rx.match(n))]


def _block_layout(unet_names: list[str], ldm: bool, lpb: int) -> tuple[int, int, set[int], set[int], int]:
    """(blocks, layers per block, down blocks with attention, up blocks with attention, transformer depth) that
    hold every module the names mention. The names are read for block numbers only; module paths still come from
    a real diffusers UNet built with this layout."""
    names = [n.replace(".", "_") for n in unet_names]  # dotted (PEFT) and flat (kohya) spellings alike
    depth = max([t for (t,) in _numbers(r".*transformer_blocks_(\d+)_", names)], default=0) + 1
    attn = r"(?:transformer_blocks|proj_in|proj_out|norm_)"
    if ldm:  # input_blocks.(1 + i·(L+1) + j), output_blocks.(i·(L+1) + j): kohya's names fix L only with the layout
        ins = _numbers(r"input_blocks_(\d+)_", names)
        outs = _numbers(r"output_blocks_(\d+)_", names)
        down_attn = {(k - 1) // (lpb + 1) for (k,) in _numbers(rf"input_blocks_(\d+)_1_{attn}", names)}
        up_attn = {k // (lpb + 1) for (k,) in _numbers(rf"output_blocks_(\d+)_1_{attn}", names)}
        n = max([(k - 1) // (lpb + 1) + 1 for (k,) in ins] + [k // (lpb + 1) + 1 for (k,) in outs], default=1)
        return max(n, 1), lpb, down_attn, up_attn, depth
    downs = _numbers(r"down_blocks_(\d+)_(?:attentions|resnets)_(\d+)_", names)
    ups = _numbers(r"up_blocks_(\d+)_(?:attentions|resnets)_(\d+)_", names)
    blocks = [i for i, _ in downs + ups] + [i for (i,) in _numbers(r"(?:down|up)_blocks_(\d+)_", names)]
    lpb = max([j + 1 for _, j in downs] + [j for _, j in ups] + [1])  # up blocks hold L + 1 layers
    down_attn = {i for (i,) in _numbers(r"down_blocks_(\d+)_attentions_", names)}
    up_attn = {i for (i,) in _numbers(r"up_blocks_(\d+)_attentions_", names)}
    return max(blocks, default=0) + 1, lpb, down_attn, up_attn, depth


@functools.lru_cache(maxsize=8)
def _layout_table(family_key: str, n: int, lpb: int, down_attn: frozenset, up_attn: frozenset, depth: int,
                  te_layers: tuple[tuple[str, int], ...]) -> ArchTable:
    """Module names of a UNet / text encoders with this block layout (small widths, meta device: names only)."""
    from diffusers import UNet2DConditionModel
    import transformers

    family = Family.from_key(family_key)
    micro = family.spec.micro_conditioning
    unet_cfg = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=lpb, block_out_channels=[32] * n,
        down_block_types=["CrossAttnDownBlock2D" if i in down_attn else "DownBlock2D" for i in range(n)],
        up_block_types=["CrossAttnUpBlock2D" if i in up_attn else "UpBlock2D" for i in range(n)],
        transformer_layers_per_block=depth, attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8,
        **(dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32) if micro else {}))
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**unet_cfg)}
        for te, layers in te_layers:
            cls = transformers.CLIPTextModelWithProjection if te == "text_encoder_2" else transformers.CLIPTextModel
            models[te] = cls(transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                         num_hidden_layers=layers, projection_dim=32))
    comps = {name: _component(name, m, unet_cfg if name == "unet" else None, ldm=_ldm_names(family))
             for name, m in models.items()}
    return ArchTable(family, comps, "the module names and shapes in the file (no base model given)")


def _table_from_names(family: Family, modules) -> ArchTable | None:
    """A table whose module names cover the file's and whose shapes are the file's own: for adapters of a base of
    non-standard size (the tiny bases, custom models) when no base model is given. None if the names do not fit."""
    unet_names = [slot.name for slot, _, _ in modules if slot.component == "unet"]
    ldm = _ldm_names(family) and any(n.startswith(("input_blocks", "middle_block", "output_blocks"))
                                     for n in unet_names)
    # kohya's ldm names number blocks by the layout's layers per block: the released model's (SDXL: 2), or more
    # if the file's own block numbers need more
    ref_lpb = ARCHS[family.arch][1]["layers_per_block"] if family.arch in ARCHS else 2
    n, lpb, down_attn, up_attn, depth = _block_layout(unet_names, ldm, ref_lpb)
    lpb = max(lpb, ref_lpb) if _ldm_names(family) else lpb
    te_layers = {}
    for slot, _, _ in modules:
        if slot.component != "unet":
            found = _numbers(r".*layers[._](\d+)[._]", [slot.name])
            te_layers[slot.component] = max(te_layers.get(slot.component, 1), found[0][0] + 1 if found else 1)
    try:
        table = _layout_table(family.key, n, lpb, frozenset(down_attn), frozenset(up_attn),
                              depth, tuple(sorted(te_layers.items())))
    except (ValueError, TypeError):  # a layout diffusers cannot build: the names are not a UNet's
        return None
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for slot, down, up in modules:  # names that resolve nowhere stay unresolved: loading reports them as unused
        comp = table.components.get(slot.component)
        live = comp.resolve(slot.name, slot.flat) if comp else None
        if live is not None and not (slot.flat and slot.name in comp.ambiguous):
            shapes.setdefault(slot.component, {})[live] = (up[0], *down[1:])  # out, in(, kh, kw): the file's own
    if not shapes:
        return None
    comps = {name: replace(c, shapes={**c.shapes, **shapes.get(name, {})}) for name, c in table.components.items()}
    return ArchTable(family, comps, table.source)


def _tiny_family(tiny: str) -> Family | None:
    from ..models import TINY

    return Family.from_key("sd1" if TINY.get(tiny) == "toy" else TINY.get(tiny))


def table_for_file(family: Family | None, modules, tiny: str | None = None) -> ArchTable | None:
    """The module table to read a file against when no base model is given.

    ``modules``: (slot, down shape, up shape) per module of the file. The built-in base the metadata names
    (``tiny``) or the released architecture of ``family``, if every module fits one of them; else, if some modules
    fit, the one most fit (a file for that model with bad modules: loading names them and says to pass --base);
    else a table made from the file's own names and shapes (an adapter for a base of non-standard size).
    None when the family is unknown: the file does not say which model it is for, and guessing would write wrong
    metadata.
    """
    if family is None:
        return None
    candidates = []
    if tiny and _tiny_family(tiny) is not None and _tiny_family(tiny).arch == family.arch:
        candidates.append(builtin_table(family.arch, tiny=tiny))
    if family.arch in ARCHS:
        candidates.append(builtin_table(family.arch))
    scores = [_fitting(t, modules) for t in candidates]
    if candidates and max(scores) == len(modules):
        return candidates[scores.index(len(modules))]
    if candidates and max(scores) > 0:
        return candidates[scores.index(max(scores))]
    return _table_from_names(family, modules) or (candidates[0] if candidates else None)
