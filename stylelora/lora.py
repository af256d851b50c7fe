"""LoRA layers through PEFT: inject for training, extract into an ``Adapter``, attach an ``Adapter`` back.

PEFT owns the layers (forward, dropout, scaling, multi-adapter weights); this module only moves tensors between
PEFT's per-adapter dicts (``lora_A[name]``, ``lora_B[name]``, ``lora_alpha[name]``) and our ``Adapter``.
"""

from __future__ import annotations

from collections import Counter

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from .adapter import Adapter, LoraModule, LycoModule
from .errors import AdapterError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def components(pipe) -> dict[str, torch.nn.Module]:
    """The LoRA-capable parts of a pipeline that exist: unet, text_encoder, text_encoder_2."""
    out = {"unet": pipe.unet}
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = module
    return out


def inject(module: torch.nn.Module, *, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
           adapter_name: str = "default", dora: str | None = None,
           sized: dict[str, tuple[int, float]] | None = None) -> list[str]:
    """Add fresh trainable LoRA layers (B = 0, so outputs are unchanged) to ``module``; returns the wrapped paths.

    ``dora``: "out" makes them PEFT DoRA layers (``use_dora``: a magnitude per output row), "in" adds a magnitude
    per input column (``add_input_dora``). ``sized``: more modules by full path, each with its own (rank, alpha)
    (the convolutions of ``locon_targets``)."""
    sized = dict(sized or {})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets) + sorted(sized),
                        init_lora_weights=True, use_dora=dora == "out",
                        rank_pattern={_exact(p): r for p, (r, _) in sized.items() if r != rank},
                        alpha_pattern={_exact(p): a for p, (_, a) in sized.items() if a != alpha})
    try:
        module.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:  # PEFT: "Target modules ... not found in the base model"
        raise AdapterError(f"cannot place LoRA on {type(module).__name__}: {e}. Check --unet-targets/--te-targets.") from e
    if dora == "in":
        add_input_dora(module, adapter_name)
    return [n for n, m in module.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


# kohya sd-scripts networks/lora.py: with conv_dim set, LoCon adds these blocks (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3)
# to the Transformer2DModel ones, and puts LoRA on every Linear and Conv2d inside them: Linear and 1x1 convolutions
# (time_emb_proj, conv_shortcut) at network_dim/alpha, the others (3x3 conv1, conv2, the down/upsampler conv) at
# conv_dim/conv_alpha. LyCORIS' LoCon (lycoris/kohya.py) targets the same three block classes.
LOCON_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def locon_targets(unet: torch.nn.Module, *, rank: int, alpha: float, conv_rank: int, conv_alpha: float
                  ) -> dict[str, tuple[int, float]]:
    """Full path -> (rank, alpha) of every Linear/Conv2d inside the UNet's ResNet and down/upsampler blocks."""
    out = {}
    for path, block in unet.named_modules():
        if type(block).__name__ not in LOCON_BLOCKS:
            continue
        for name, child in block.named_modules():
            if isinstance(child, torch.nn.Conv2d) and tuple(child.kernel_size) != (1, 1):
                out[f"{path}.{name}"] = (conv_rank, conv_alpha)
            elif isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                out[f"{path}.{name}"] = (rank, alpha)
    return out


# --- DoRA with the magnitude on the input axis -------------------------------------------------------------------
# PEFT's DoRA (use_dora) keeps one magnitude per output row: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row. The kohya-key DoRA
# files AUTOMATIC1111 reads (and ComfyUI reads correctly) have one per input column instead (docs/formats.md), and
# the two layouts are not convertible into each other at a low rank. PEFT has no input-axis DoRA, so it is written
# here, on top of PEFT's plain LoRA layer: W' = (W + ΔW) · diag(g), g = m / ‖W + ΔW‖_col, and
# W'x = (W + ΔW)(g ⊙ x), so scaling the layer's input by g before PEFT's own forward is the whole method. As in
# PEFT (and the DoRA paper, section 4.3), the norm is detached: it takes no gradient.
DORA_IN = "stylelora_dora_in"  # the ParameterDict attribute on a PEFT LoRA layer: adapter name -> magnitude [in]


def _column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per input column (dim 1), over the output rows and a conv kernel."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def _input_scale(layer, name: str) -> torch.Tensor:
    base = layer.get_base_layer()
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        delta = (b.flatten(1).float() @ a.flatten(1).float()).reshape(base.weight.shape) * layer.scaling[name]
        norm = _column_norm(base.weight.float() + delta)
    return getattr(layer, DORA_IN)[name] / norm


def _dora_in_hook(layer, args):
    dora = getattr(layer, DORA_IN, None)
    if not args or dora is None or getattr(layer, "disable_adapters", False):
        return None
    names = [n for n in layer.active_adapters if n in dora]
    if not names:
        return None
    x = args[0]
    for name in names:
        g = _input_scale(layer, name)
        shape = [1] * x.dim()
        shape[1 if isinstance(layer.get_base_layer(), torch.nn.Conv2d) else -1] = -1  # channels of NCHW / last
        x = x * g.to(x.dtype).reshape(shape)
    return (x, *args[1:])


def add_input_dora(module: torch.nn.Module, adapter_name: str) -> int:
    """Give every ``adapter_name`` LoRA layer of ``module`` a trainable magnitude per input column, initialised
    to ‖W₀‖ per column (so the output is unchanged at the start); returns the number of layers."""
    count = 0
    for _, layer in lora_layers(module, adapter_name):
        weight = layer.get_base_layer().weight
        kind = layer.get_base_layer()
        if not isinstance(kind, (torch.nn.Linear, torch.nn.Conv2d)) or weight.dim() not in (2, 4) or \
                getattr(kind, "groups", 1) != 1:
            raise AdapterError(f"DoRA with --dora-layout in on {type(kind).__name__} (groups "
                               f"{getattr(kind, 'groups', 1)}): only Linear and ungrouped Conv2d layers; check "
                               "--unet-targets/--te-targets or use --dora-layout out")
        if not hasattr(layer, DORA_IN):
            setattr(layer, DORA_IN, torch.nn.ParameterDict())
            layer.register_forward_pre_hook(_dora_in_hook)
        with torch.no_grad():
            m = _column_norm(weight.detach().float())
        getattr(layer, DORA_IN)[adapter_name] = torch.nn.Parameter(m)
        count += 1
    return count


def _drop_input_dora(layer, name: str) -> None:
    dora = getattr(layer, DORA_IN, None)
    if dora is not None and name in dora:
        del dora[name]


def dora_of(layer, name: str) -> tuple[str, torch.Tensor] | None:
    """("out" | "in", magnitude) of a DoRA layer for adapter ``name``, as a 1-D tensor; None for a plain LoRA one."""
    if name in getattr(layer, DORA_IN, {}):
        return "in", getattr(layer, DORA_IN)[name]
    if getattr(layer, "use_dora", {}).get(name):
        return "out", layer.lora_magnitude_vector[name].weight
    return None


def lora_layers(module: torch.nn.Module, adapter_name: str):
    """Yield (path, layer) for each PEFT LoRA layer holding ``adapter_name``."""
    for path, m in module.named_modules():
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
            yield path, m


def extract(pipe, adapter_name: str = "default", *, dtype: torch.dtype = torch.float32) -> Adapter:
    """Copy an adapter's weights out of the PEFT layers into an ``Adapter`` (detached, on CPU)."""
    adapter = Adapter(name=adapter_name)
    for comp, module in components(pipe).items():
        mods = {}
        for path, layer in lora_layers(module, adapter_name):
            down = layer.lora_A[adapter_name].weight.detach().to("cpu", dtype).clone()
            up = layer.lora_B[adapter_name].weight.detach().to("cpu", dtype).clone()
            alpha = float(layer.lora_alpha[adapter_name])
            dora = dora_of(layer, adapter_name)
            if dora is None:
                mods[path] = LoraModule(down=down, up=up, alpha=alpha)
                continue
            axis, m = dora
            shape = tuple(layer.get_base_layer().weight.shape)
            ones = [1] * (len(shape) - 1)
            # dora_scale as LyCORIS shapes it: [out, 1(, 1, 1)] (wd_on_out) or [1, in(, 1, 1)] (as OneTrainer's)
            m = m.detach().to("cpu", dtype).clone()
            scale = m.reshape(shape[0], *ones) if axis == "out" else m.reshape(1, shape[1], *ones[1:])
            mods[path] = LycoModule("lora", {"down": down, "up": up, "dora_scale": scale}, alpha, shape, axis)
        if mods:
            adapter.modules[comp] = mods
    return adapter


def attach(pipe, adapter: Adapter, adapter_name: str) -> None:
    """Add ``adapter`` to ``pipe`` as PEFT layers named ``adapter_name`` (unfused; scale via PEFT's set_adapters)."""
    parts = components(pipe)
    for comp, mods in adapter.modules.items():
        if not mods:
            continue
        if comp not in parts:
            raise AdapterError(f"adapter {adapter.name!r} has {comp} weights but the base has no {comp}")
        module = parts[comp]
        ranks = {p: m.rank for p, m in mods.items()}
        alphas = {p: m.alpha for p, m in mods.items()}
        r0 = Counter(ranks.values()).most_common(1)[0][0]
        a0 = Counter(alphas.values()).most_common(1)[0][0]
        config = LoraConfig(
            r=r0, lora_alpha=a0, target_modules=sorted(mods),
            rank_pattern={_exact(p): r for p, r in ranks.items() if r != r0},
            alpha_pattern={_exact(p): a for p, a in alphas.items() if a != a0},
        )
        module.add_adapter(config, adapter_name=adapter_name)
        layers = dict(lora_layers(module, adapter_name))
        missing = sorted(set(mods) - set(layers))
        if missing:
            raise AdapterError(f"adapter {adapter.name!r}: no {comp} module for {missing[:5]}")
        with torch.no_grad():
            for path, m in mods.items():
                layer = layers[path]
                a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                if a.shape != m.down.shape or b.shape != m.up.shape:
                    raise AdapterError(f"adapter {adapter.name!r}: {comp}.{path} shape {tuple(m.down.shape)}/"
                                       f"{tuple(m.up.shape)} does not fit the layer ({tuple(a.shape)}/{tuple(b.shape)})")
                a.copy_(m.down.to(a.dtype))
                b.copy_(m.up.to(b.dtype))


def _exact(path: str) -> str:
    # PEFT matches rank_pattern keys as regexes against the end of a module name; anchor to the full path.
    return "^" + path.replace(".", r"\.") + "$"


def remove(pipe, adapter_name: str) -> None:
    """Take an adapter's PEFT layers out of every component; the original modules come back when none remain."""
    from diffusers.utils import recurse_remove_peft_layers

    for module in components(pipe).values():
        names = {n for _, m in module.named_modules() if isinstance(m, LoraLayer) for n in m.lora_A}
        if adapter_name not in names:
            continue
        if names == {adapter_name}:
            recurse_remove_peft_layers(module)  # unwrap base_layer so module paths/state-dict keys are original again
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if hasattr(module, attr):
                    delattr(module, attr) if attr == "peft_config" else setattr(module, attr, False)
        elif hasattr(module, "delete_adapters"):
            for _, layer in lora_layers(module, adapter_name):
                _drop_input_dora(layer, adapter_name)
            module.delete_adapters(adapter_name)
        else:
            for _, layer in lora_layers(module, adapter_name):
                _drop_input_dora(layer, adapter_name)
            module.delete_adapter(adapter_name)


def freeze_down(module: torch.nn.Module, adapter_name: str, rows) -> int:
    """Set every ``adapter_name`` layer's ``lora_A`` weight to ``rows(path, shape)`` (a tensor of that shape) and
    freeze it (only ``lora_B`` trains); returns the number of layers set. Orthogonal slots use it
    (stylelora/orthogonal.py); the weights keep their dtype and device."""
    count = 0
    with torch.no_grad():
        for path, layer in lora_layers(module, adapter_name):
            weight = layer.lora_A[adapter_name].weight
            weight.copy_(rows(path, tuple(weight.shape)).to(weight.dtype))
            weight.requires_grad_(False)
            count += 1
    return count


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
