"""The kohya / A1111 layout: ``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight`` and a 0-dim ``.alpha``."""

from __future__ import annotations

import json
from collections import Counter

import torch

from ..adapter import Adapter, LoraModule, LycoModule
from ..errors import AdapterError
from ..models import Family, family_with_component
from .arch import ArchTable, kohya_name
from .keys import role_suffix


def prefixes(family: Family | None, adapter: Adapter) -> dict[str, str]:
    """kohya key prefix per component, from the family's row (``lora_te`` for one text encoder,
    ``lora_te1``/``lora_te2`` for SDXL). Unknown family: a second text encoder implies its family; else SD1's."""
    if family is None:
        family = (family_with_component("text_encoder_2") if adapter.modules.get("text_encoder_2") else None) \
            or Family.from_key("sd1")
    return dict(family.spec.kohya_prefixes)


def to_state_dict(adapter: Adapter, family: Family | None, table: ArchTable | None) -> dict[str, torch.Tensor]:
    """Tensors in kohya layout. SDXL UNet modules get ldm names; alpha is stored as a float32 scalar."""
    names = prefixes(family, adapter)
    if adapter.modules.get("text_encoder_2") and family and "text_encoder_2" not in family.text_encoders:
        raise AdapterError(f"adapter has text_encoder_2 modules, which {family.spec.name} models do not have")
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for comp in adapter.components():
        for path, m in adapter.modules[comp].items():
            name = kohya_name(comp, path, names, table, family)
            if name in owner:
                raise AdapterError(f"modules {owner[name]} and {comp}.{path} would both be saved as {name}")
            owner[name] = f"{comp}.{path}"
            if isinstance(m, LycoModule):  # LyCORIS / diff / DoRA tensors under their own suffixes, as read
                out.update({f"{name}.{role_suffix(role)}": t.detach().cpu().contiguous()
                            for role, t in m.tensors.items()})
                if m.alpha is not None:
                    out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
                continue
            out[f"{name}.lora_down.weight"] = m.down.detach().cpu().contiguous()
            out[f"{name}.lora_up.weight"] = m.up.detach().cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def _most_common(values) -> float:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], -v))


def summary_metadata(adapter: Adapter, family: Family | None) -> dict[str, str]:
    """kohya's minimum metadata, from the tensors themselves (so it never disagrees with them)."""
    every = [m for c in adapter.components() for m in adapter.modules[c].values()]
    # DoRA pairs (what `train --network dora` writes) count for dim/alpha like plain ones
    dora = [m for m in every if isinstance(m, LycoModule) and m.kind == "lora" and m.dora]
    mods = [m for m in every if not isinstance(m, LycoModule)] + \
        [LoraModule(down=m.tensors["down"], up=m.tensors["up"], alpha=float(m.alpha if m.alpha is not None
                                                                             else m.rank)) for m in dora]
    md = {"ss_network_module": "lycoris.kohya" if adapter.lyco() else "networks.lora"}
    if mods:
        md["ss_network_dim"] = str(int(_most_common(m.rank for m in mods)))
        md["ss_network_alpha"] = str(float(_most_common(m.alpha for m in mods)))
        convs = [m for m in mods if m.down.dim() == 4 and tuple(m.down.shape[2:]) != (1, 1)]
        if convs:
            md["ss_network_args"] = json.dumps({"conv_dim": str(int(_most_common(m.rank for m in convs))),
                                                "conv_alpha": str(float(_most_common(m.alpha for m in convs)))})
    if dora and len(dora) == len(every):  # LyCORIS' network args for such a file (lycoris/kohya.py)
        axes = {m.dora_axis for m in dora}
        args = json.loads(md.get("ss_network_args", "{}"))
        md["ss_network_args"] = json.dumps({**args, "algo": "lora", "dora_wd": "True",
                                            **({"wd_on_out": str(axes == {"out"})} if len(axes) == 1 else {})})
    if family is not None:
        md["ss_v2"] = str(family.spec.ss_v2)
        md["ss_base_model_version"] = family.ss_base_model_version
    return md
