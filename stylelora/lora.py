"""LoRA layers through PEFT: inject for training, extract into an ``Adapter``, attach an ``Adapter`` back.

PEFT owns the layers (forward, dropout, scaling, multi-adapter weights); this module only moves tensors between
PEFT's per-adapter dicts (``lora_A[name]``, ``lora_B[name]``, ``lora_alpha[name]``) and our ``Adapter``.
"""

from __future__ import annotations

from collections import Counter

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from .adapter import Adapter, LoraModule
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
           adapter_name: str = "default") -> list[str]:
    """Add fresh trainable LoRA layers (B = 0, so outputs are unchanged) to ``module``; returns the wrapped paths."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        init_lora_weights=True)
    try:
        module.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:  # PEFT: "Target modules ... not found in the base model"
        raise AdapterError(f"cannot place LoRA on {type(module).__name__}: {e}. Check --unet-targets/--te-targets.") from e
    return [n for n, m in module.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


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
            mods[path] = LoraModule(
                down=layer.lora_A[adapter_name].weight.detach().to("cpu", dtype).clone(),
                up=layer.lora_B[adapter_name].weight.detach().to("cpu", dtype).clone(),
                alpha=float(layer.lora_alpha[adapter_name]),
            )
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
            module.delete_adapters(adapter_name)
        else:
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
