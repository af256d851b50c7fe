"""diffusers -> original Stable Diffusion (ldm) checkpoint keys, for SD1.x / SD2.x single-file export.

The layout is the one A1111, ComfyUI and diffusers' ``from_single_file`` read: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.text_model.*`` (SD1 CLIP) or
``cond_stage_model.model.*`` (SD2 OpenCLIP). Keys are mapped structurally from the parsed module path; a key
that fits no rule raises, naming it, instead of being dropped.
"""

from __future__ import annotations

import torch

from .errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


class _Unmapped(KeyError):
    pass


def _sub(table: dict[str, str], rest: str) -> str:
    """Map the leading module name(s) of ``rest`` ("norm1.weight", "to_out.0.bias") through ``table``."""
    for src, dst in table.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src):]
    raise _Unmapped(rest)


# ------------------------------------------------------------------------------ UNet module names: diffusers -> ldm
# The one home of the diffusers -> ldm (sgm) UNet naming: single-file export maps state-dict keys with it, and the
# adapter module tables (formats/arch.py) use it for kohya's SDXL LoRA names and for reading ldm-named files.
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


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""

    def key(k: str) -> str:
        module, _, param = k.rpartition(".")
        name = ldm_unet_path(module, config)
        if name is None:
            raise _Unmapped(k)
        return f"{UNET_PREFIX}{name}.{param}"

    return _convert(state, key, "unet")


def _vae_key(key: str, n_up: int) -> tuple[str, bool]:
    """(ldm key, whether the tensor is a mid-block attention weight that ldm stores as a 1x1 conv)."""
    coder, rest = key.split(".", 1)
    if coder not in ("encoder", "decoder"):
        if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
            return key, False
        raise _Unmapped(key)
    p = rest.split(".")
    if p[0] in _VAE_TOP:
        return f"{coder}.{_VAE_TOP[p[0]]}.{'.'.join(p[1:])}", False
    if p[0] == "mid_block":
        kind, j, tail = p[1], int(p[2]), ".".join(p[3:])
        if kind == "resnets":
            return f"{coder}.mid.block_{j + 1}.{_sub(_VAE_RESNET, tail)}", False
        if kind == "attentions" and j == 0:
            return f"{coder}.mid.attn_1.{_sub(_VAE_ATTN, tail)}", tail.endswith("weight") and "norm" not in tail
    if p[0] in ("down_blocks", "up_blocks"):
        i, kind, tail = int(p[1]), p[2], ".".join(p[3:])
        # ldm numbers decoder levels bottom-up: diffusers' up_blocks.0 is ldm's up.{n-1}
        level, what = (i, "down") if p[0] == "down_blocks" else (n_up - 1 - i, "up")
        if kind == "resnets":
            j, tail = tail.split(".", 1)
            return f"{coder}.{what}.{level}.block.{j}.{_sub(_VAE_RESNET, tail)}", False
        sampler = {"downsamplers": "downsample", "upsamplers": "upsample"}.get(kind)
        if sampler and tail.startswith("0.conv."):
            return f"{coder}.{what}.{level}.{sampler}.conv.{tail[7:]}", False
    raise _Unmapped(key)


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys (mid attention as 1x1 convs)."""
    n_up = len(config["up_block_types"] if isinstance(config, dict) else config.up_block_types)
    out = {}
    bad = []
    for key, t in state.items():
        try:
            new, conv = _vae_key(key, n_up)
        except _Unmapped:
            bad.append(key)
            continue
        out[VAE_PREFIX + new] = t[:, :, None, None] if conv and t.dim() == 2 else t
    _raise_unmapped(bad, "vae")
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict (with or without the ``text_model.`` level) -> SD1 ldm keys."""
    out = {}
    for key, t in state.items():
        if key.endswith("position_ids"):
            continue
        out[CLIP_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = t
    return out


def _open_clip_key(key: str) -> str:
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    if key in top:
        return top[key]
    p = key.split(".")
    if p[:2] == ["encoder", "layers"]:
        return f"transformer.resblocks.{p[2]}.{_sub(_OPEN_CLIP_LAYER, '.'.join(p[3:]))}"
    raise _Unmapped(key)


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel (SD2's OpenCLIP-H) state dict -> ``cond_stage_model.model.*`` keys.

    OpenCLIP stores q/k/v as one ``in_proj`` matrix, concatenated in that order.
    """
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out, bad, qkv = {}, [], {}
    for key, t in state.items():
        p = key.split(".")
        if p[:2] == ["encoder", "layers"] and p[3] == "self_attn" and p[4] in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault((p[2], p[5]), {})[p[4]] = t
            continue
        try:
            out[OPEN_CLIP_PREFIX + _open_clip_key(key)] = t
        except _Unmapped:
            bad.append(key)
    _raise_unmapped(bad, "text_encoder")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise ModelError(f"text encoder layer {layer}: incomplete q/k/v {kind} ({sorted(parts)})")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.attn.{name}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def _convert(state, fn, what: str) -> dict[str, torch.Tensor]:
    out, bad = {}, []
    for key, t in state.items():
        try:
            out[fn(key)] = t
        except _Unmapped:
            bad.append(key)
    _raise_unmapped(bad, what)
    return out


def _raise_unmapped(bad: list[str], what: str) -> None:
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ModelError(f"cannot express these {what} weights in the original SD checkpoint layout: "
                         f"{', '.join(bad[:8])}{more}. Single-file export supports SD1.x/SD2.x pipelines; "
                         "save a diffusers folder instead.")


def pipeline_to_ldm(pipe, family) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights in the original SD single-file layout (families whose row names a
    ``single_file_text_encoder`` layout: SD1.x / SD2.x)."""
    from .models import FAMILIES, Family

    spec = family.spec if isinstance(family, Family) else FAMILIES.get(str(family))
    if spec is None or spec.single_file_text_encoder is None:
        able = " and ".join(s.name for s in FAMILIES.values() if s.single_file_text_encoder and s.key == s.arch)
        raise ModelError(f"single-file export supports {able} bases, not {spec.name if spec else family}; "
                         "bake a diffusers folder")
    te_state = pipe.text_encoder.state_dict()
    te = clip_to_ldm(te_state) if spec.single_file_text_encoder == "clip" else open_clip_to_ldm(te_state)
    state = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
             **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config), **te}
    return {k: v.detach().contiguous() for k, v in state.items()}
