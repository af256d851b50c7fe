"""Module tables: which LoRA-able modules a model has, and every name a file may give each of them.

A table is built from ``named_modules()`` of a live model, or of the real architecture built on the meta device
(no weights) for SD1.5, SD2.x and SDXL. Reading maps a file's key to a module by dictionary lookup in the table,
never by repairing underscores. The names a module gets are:

- its live path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``);
- for the UNet, its ldm/sgm path (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``), which kohya uses for SDXL;
- for CLIP, the ``text_model.``-prefixed path older transformers used (newer ones flatten ``CLIPTextModel``);
- the kohya spelling of each of these: dots become underscores (``lora_unet_`` + that).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..errors import AdapterError
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

# arch -> (display name, UNet config, {text-encoder component: (transformers class name, config)})
ARCHS = {
    "sd1": ("SD1.5", SD15_UNET, {"text_encoder": ("CLIPTextModel", CLIP_L)}),
    "sd2": ("SD2.x", SD2_UNET, {"text_encoder": ("CLIPTextModel", OPENCLIP_H)}),
    "sdxl": ("SDXL", SDXL_UNET, {"text_encoder": ("CLIPTextModel", CLIP_L),
                                 "text_encoder_2": ("CLIPTextModelWithProjection", OPENCLIP_BIGG)}),
}

# ---------------------------------------------------------------------------------------- ldm (sgm) names
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _cfg(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def _resnet_ldm(rest: list[str]) -> str | None:
    if not rest or rest[0] not in _RESNET_LDM:
        return None
    return ".".join([_RESNET_LDM[rest[0]], *rest[1:]])


def ldm_unet_path(path: str, config) -> str | None:
    """The ldm/sgm name of a diffusers UNet module path, or None if it has none.

    Down block i, layer j is ``input_blocks.(1 + Σ_{k<i} (L_k + 1) + j)`` and up block i, layer j is
    ``output_blocks.(Σ_{k<i} (L'_k + 1) + j)`` with L = layers_per_block (L' reversed): ``3i + j + 1`` and
    ``3i + j`` for SD1/SDXL's L = 2, as in FORMATS.md. Resnets sit at ``.0``, attentions at ``.1``.
    """
    if path in _TOP_LDM:
        return _TOP_LDM[path]
    parts = path.split(".")
    down_types = list(_cfg(config, "down_block_types"))
    up_types = list(_cfg(config, "up_block_types"))
    lpb = _cfg(config, "layers_per_block", 2)
    lpb = [lpb] * len(down_types) if isinstance(lpb, int) else list(lpb)
    if parts[0] == "mid_block":
        return _mid_ldm(path)
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    top, i, kind, rest = parts[0], int(parts[1]), parts[2], parts[3:]
    if kind != "downsamplers" and kind != "upsamplers":
        if not rest or not rest[0].isdigit():
            return None
        j, rest = int(rest[0]), rest[1:]
    if top == "down_blocks" and i < len(down_types):
        start = 1 + sum(n + 1 for n in lpb[:i])
        if kind == "resnets":
            inner = _resnet_ldm(rest)
            return inner and f"input_blocks.{start + j}.0.{inner}"
        if kind == "attentions":
            return ".".join([f"input_blocks.{start + j}.1", *rest])
        if kind == "downsamplers" and rest == ["0", "conv"]:
            return f"input_blocks.{start + lpb[i]}.0.op"
    elif top == "up_blocks" and i < len(up_types):
        up_lpb = list(reversed(lpb))
        start = sum(n + 1 for n in up_lpb[:i])
        if kind == "resnets":
            inner = _resnet_ldm(rest)
            return inner and f"output_blocks.{start + j}.0.{inner}"
        if kind == "attentions":
            return ".".join([f"output_blocks.{start + j}.1", *rest])
        if kind == "upsamplers" and rest == ["0", "conv"]:
            slot = 2 if "CrossAttn" in up_types[i] else 1
            return f"output_blocks.{start + up_lpb[i]}.{slot}.conv"
    return None


def _mid_ldm(path: str) -> str | None:
    parts = path.split(".")
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    kind, j, rest = parts[1], int(parts[2]), parts[3:]
    if kind == "resnets":
        inner = _resnet_ldm(rest)
        return inner and f"middle_block.{2 * j}.{inner}"
    if kind == "attentions":
        return ".".join([f"middle_block.{2 * j + 1}", *rest])
    return None


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

    def resolve(self, name: str, flat: bool) -> str | None:
        return (self.flat if flat else self.dotted).get(name)


@dataclass
class ArchTable:
    family: Family | None
    components: dict[str, ComponentTable]
    source: str  # for messages: "the base model", "the built-in SD1.5 architecture", ...


def build_component(name: str, shapes: dict[str, tuple[int, ...]], unet_config=None,
                    ldm: bool = False) -> ComponentTable:
    """Index every spelling of every module; ``ldm`` makes the written kohya UNet names ldm (SDXL)."""
    table = ComponentTable(name, dict(shapes))
    for path in shapes:
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


def table_from_pipe(pipe, family: Family) -> ArchTable:
    """The table of a loaded pipeline (its UNet and text encoders)."""
    comps = {"unet": build_component("unet", lora_targets(pipe.unet), pipe.unet.config, ldm=family.arch == "sdxl")}
    for te in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, te, None)
        if model is not None:
            comps[te] = build_component(te, lora_targets(model))
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
        name: build_component(name, lora_targets(m), unet_cfg if name == "unet" else None, ldm=arch == "sdxl")
        for name, m in models.items()
    }
    return ArchTable(Family(arch), comps, f"the built-in {label} architecture")


def kohya_name(component: str, path: str, prefixes: dict[str, str], table: ArchTable | None, arch: str | None) -> str:
    """The kohya module name written for a live path (``lora_unet_...``), without a tensor suffix."""
    comp = table.components.get(component) if table else None
    if comp is not None and path in comp.kohya_out:
        name = comp.kohya_out[path]
    elif component == "unet":
        name = ldm_unet_path(path, SDXL_UNET) if arch == "sdxl" else path
    else:
        name = te_canonical_path(path)
    if name is None:
        raise AdapterError(f"UNet module {path!r} has no ldm (sgm) name, which kohya's SDXL layout needs")
    return prefixes[component] + "_" + name.replace(".", "_")


def peft_name(component: str, path: str, table: ArchTable | None) -> str:
    comp = table.components.get(component) if table else None
    if comp is not None and path in comp.peft_out:
        return comp.peft_out[path]
    return path if component == "unet" else te_canonical_path(path)
