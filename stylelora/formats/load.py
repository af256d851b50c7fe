"""Loading any supported LoRA file into an ``Adapter`` keyed by live module paths, checking it on the way."""

from __future__ import annotations

import logging
from pathlib import Path

from ..adapter import Adapter, LoraModule, LycoModule
from ..errors import AdapterError
from ..models import Family, detect_family
from . import embeddings, lyco, peft, validate
from .arch import ArchTable, table_for_file, table_from_pipe
from .io import read_tensors, weights_file
from .keys import Group, ParsedKeys, family_from_keys, family_from_metadata, parse_keys, tiny_spec

log = logging.getLogger(__name__)


def family_for_key(key: str | None) -> Family | None:
    """``Family`` for a key such as ``sd2-v`` (None for None or an unknown key)."""
    return Family.from_key(key)


def file_family(metadata: dict[str, str], parsed: ParsedKeys, tensors: dict) -> tuple[str | None, str]:
    """(family key, evidence) from metadata first, then key prefixes, then the cross-attention width."""
    found, why = family_from_metadata(metadata)
    if found is None:
        found, why = family_from_keys(tensors.keys(), parsed, lambda k: tuple(tensors[k].shape))
    return found, why


def _table(file, pipe, family, found, why, metadata, parsed: ParsedKeys, tensors, raws) -> ArchTable | None:
    if pipe is not None:
        target = detect_family(pipe)
        validate.check_family(file, found, why, target, "the base model")
        return table_from_pipe(pipe, target)
    if family is not None:
        validate.check_family(file, found, why, family, "the requested family")
    modules = [(slot, tuple(tensors[g.keys["down"]].shape), tuple(tensors[g.keys["up"]].shape))
               for slot, g in parsed.groups.items() if "down" in g.keys and "up" in g.keys and slot not in raws]
    # other adapter types: the shape of their product, as a rank-1 (down, up) pair would give it (norm layers'
    # 1-D weights say nothing about which architecture fits)
    modules += [(slot, (1, *raw[1:]), (raw[0], 1)) for slot, raw in raws.items() if len(raw) >= 2]
    return table_for_file(family or family_for_key(found), modules, tiny_spec(metadata))


def _module(file, group: Group, tensors, cfg: dict | None, names: list[str]) -> LoraModule:
    keys = group.keys
    if "down" not in keys or "up" not in keys:
        have = keys.get("down") or keys.get("up") or keys.get("alpha")
        missing = "up" if "down" in keys else "down"
        raise AdapterError(f"{file}: {have} has no matching {missing} weight")
    down, up = tensors[keys["down"]], tensors[keys["up"]]
    validate.check_pair(file, keys["down"], down, keys["up"], up)
    rank = int(down.shape[0])
    if "alpha" in keys:
        alpha = validate.alpha_from_tensor(file, keys["alpha"], tensors[keys["alpha"]])
    elif cfg:
        alpha = validate.check_alpha(file, f"{peft.METADATA_KEY} ({keys['down']})",
                                     peft.alpha_from_config(file, cfg, names, rank))
    else:  # no alpha anywhere: kohya and diffusers both read this as alpha = rank (scale 1)
        alpha = float(rank)
    return LoraModule(down=down, up=up, alpha=alpha)


def _unused_message(file, unused: list[str], table: ArchTable, pipe) -> str:
    hint = "" if pipe is not None else " or pass --base (base model) to resolve them against your own model"
    return (f"{file}: {len(unused)} key(s) match no module of {table.source}: {validate.short_list(unused)}. "
            f"Is the adapter for another model? Use --allow-unused-keys (allow_unused_keys=True) to load the "
            f"rest{hint}.")


def load_adapter(path, *, pipe=None, family: Family | None = None, allow_unused_keys: bool = False) -> Adapter:
    """Read a LoRA file (kohya, PEFT, older diffusers spellings; a diffusers output folder; a tensor pickle).

    Modules are keyed by the live module paths of ``pipe`` if given (shapes and family are checked against it),
    else of the built-in architecture of the family the file declares (metadata, key prefixes, or shapes).
    """
    src = Path(path)
    file = weights_file(src)
    everything, metadata = read_tensors(file)
    emb_tensors, tensors = embeddings.split(everything)
    parsed = parse_keys(tensors)
    if parsed.unsupported:
        raise AdapterError(f"{file}: not supported: {validate.short_list(parsed.unsupported)} (OFT/BOFT, GLoRA, "
                           "(IA)^3 or LoRA-bias keys); stylelora reads LoRA, LoCon, LoHa, LoKr, full and norm-layer "
                           "difference and DoRA modules")
    if parsed.duplicates:
        a, b = parsed.duplicates[0]
        raise AdapterError(f"{file}: keys {a} and {b} hold the same weight of one module")
    if not parsed.groups:
        hint = "; it holds only token embeddings: read it with load_embedding" if emb_tensors and not tensors else ""
        raise AdapterError(f"{file}: no LoRA weights found (keys: {validate.short_list(sorted(everything))}){hint}")
    found, why = file_family(metadata, parsed, everything)
    raws = {slot: lyco.raw_shape(file, g, tensors) for slot, g in parsed.groups.items() if lyco.is_lyco(g)}
    table = _table(file, pipe, family, found, why, metadata, parsed, tensors, raws)
    if table is None:
        raise AdapterError(f"{file}: cannot tell which model family this adapter is for (no stylelora, kohya or "
                           "ModelSpec metadata, and its keys and shapes do not say). Pass --base (pipe=...) or "
                           "family=...")
    configs = peft.read_configs(file, metadata)
    hint = "" if pipe is not None else f" (checked against {table.source}; pass --base to check against yours)"
    modules: dict[str, dict[str, LoraModule | LycoModule]] = {}
    unused = list(parsed.unrecognized)
    for slot, group in parsed.groups.items():
        comp = table.components.get(slot.component)
        live = comp.resolve(slot.name, slot.flat) if comp else None
        if live is None:
            unused.extend(group.keys.values())
            continue
        first = group.keys.get("down") or lyco.first_key(group)
        if slot.flat and slot.name in comp.ambiguous:
            raise AdapterError(f"{file}: {first} could name more than one module of {table.source}")
        names = [slot.name, live, comp.peft_out.get(live, live)]
        if slot in raws:
            m = lyco.build(file, group, tensors, raws[slot], comp.weight_shape(live), live, hint)
            if m.alpha is None and m.kind in ("lora", "tucker") and configs.get(slot.component):
                m.alpha = validate.check_alpha(file, f"{peft.METADATA_KEY} ({first})", peft.alpha_from_config(
                    file, configs[slot.component], names, m.rank))
        else:
            if (configs.get(slot.component) or {}).get("use_dora"):  # never read a DoRA module as a plain LoRA
                raise AdapterError(f"{file}: {peft.METADATA_KEY} says {slot.component}.use_dora=true but "
                                   f"{first} has no lora_magnitude_vector beside it")
            m = _module(file, group, tensors, configs.get(slot.component), names)
            m = validate.fit_shape(file, group.keys["down"], live, m, comp.weight_shape(live), hint)
        target = modules.setdefault(slot.component, {})
        if live in target:
            raise AdapterError(f"{file}: {first} and another key both target {slot.component} module {live}")
        target[live] = m
    if unused:
        message = _unused_message(file, sorted(unused), table, pipe)
        if not allow_unused_keys:
            raise AdapterError(message)
        log.warning("%s (ignored)", message)
    if not modules:
        raise AdapterError(f"{file}: none of its LoRA keys match a module of {table.source}")
    fam = found or (table.family.key if table.family else None)
    embs = _embeddings(file, emb_tensors, pipe, table, family or family_for_key(fam))
    return Adapter(modules=modules, metadata=dict(metadata), family=fam, name=src.stem if src.is_file() else src.name,
                   embeddings=embs)


def _embeddings(file, tensors, pipe, table: ArchTable, family: Family | None) -> dict:
    """The file's token embeddings, checked against the base model's text-encoder widths (or a built-in
    architecture's; a table guessed from the file's own modules does not know them)."""
    if not tensors:
        return {}
    if pipe is not None:
        widths = embeddings.widths_of_pipe(pipe)
    else:
        widths = embeddings.widths_of_table(table) if table.source.startswith("the built-in") else None
    found = embeddings.from_tensors(file, tensors, widths=widths or None, where=table.source)
    keys_of = embeddings.peft_keys if any(k.startswith(embeddings.PEFT_PREFIX) for k in tensors) \
        else embeddings.kohya_keys
    embeddings.check_family(file, found, family, keys_of)
    return found
