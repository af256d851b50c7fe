"""What an adapter file holds, read from its header alone (no module resolution): the data behind ``inspect``.

The dictionary ``describe`` returns is the ``stylelora inspect --json`` output; its schema is documented in
docs/inspect-json.md. Bump ``SCHEMA_VERSION`` when a field changes meaning or goes away.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
from collections import Counter
from pathlib import Path

from ..errors import AdapterError
from ..tensorfile import open_safetensors
from . import embeddings, peft
from .io import PICKLE_SUFFIXES, check_dtypes, model_hashes, read_tensors, weights_file
from .keys import family_from_keys, family_from_metadata, parse_keys

SCHEMA_VERSION = 2  # 2: LyCORIS/DoRA modules are read (supported, unsupported_keys, types; rank may be null)
_LDM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
_DIFFUSERS_BLOCKS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "time_embedding_",
                     "add_embedding_")


# Metadata comes from whoever made the file: every reader below returns None for what it cannot use (wrong type,
# NaN/inf, out-of-range times, JSON nested past Python's recursion limit) instead of raising, so one odd file never
# breaks `inspect` or a listing.
_MAX_JSON = 4 << 20  # characters: larger metadata JSON is not parsed for display


def _num(value, kind=float):
    try:
        out = kind(value) if value not in (None, "", "None") else None
    except (TypeError, ValueError, OverflowError):
        return None
    return None if isinstance(out, float) and not math.isfinite(out) else out


def _iso(ts) -> str | None:
    t = _num(ts)
    try:
        return None if t is None else datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def finite(value):
    """``value`` (parsed JSON) with NaN/inf numbers replaced by None, so JSON output stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def _json(value):
    if not value or not isinstance(value, str) or len(value) > _MAX_JSON:
        return None
    try:
        return finite(json.loads(value))
    except (ValueError, RecursionError):
        return None


def _read(file: Path):
    """(tensor name -> (shape, dtype), alpha values, embedding tensors, metadata) without loading LoRA weights."""
    if file.suffix.lower() in PICKLE_SUFFIXES:
        tensors, md = read_tensors(file)
        entries = {k: (list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
        alphas = {k: float(t.float().reshape(-1)[0]) for k, t in tensors.items() if k.endswith(".alpha") and t.numel()}
        return entries, alphas, embeddings.split(tensors)[0], md
    with open_safetensors(file, floats_only=False) as f:
        entries = {k: f.entry(k) for k in f.keys()}
        check_dtypes(file, {k: e[1] for k, e in entries.items()})  # floats, and integer alphas (diffusers)
        alphas = {k: float(f.tensor(k).float().reshape(-1)[0]) for k in entries
                  if k.endswith(".alpha") and math.prod(entries[k][0])}
        emb = {k: f.tensor(k) for k in entries if embeddings.is_embedding_key(k)}  # small: a few vectors
        md = f.metadata
    return entries, alphas, emb, md


def _embeddings(file, tensors, entries) -> tuple[list[dict], str | None]:
    """Per learnt embedding: word, token count, and per text encoder its key, width, dtype and mean vector norm."""
    keys: dict[str, dict[str, str]] = {}
    try:
        found = embeddings.from_tensors(file, tensors, keys_out=keys)
    except AdapterError as e:
        return [], str(e)
    rows = []
    for word, emb in sorted(found.items()):
        rows.append({"name": word, "num_tokens": emb.num_tokens, "tokens": emb.tokens(), "components": {
            comp: {"key": keys[word][comp], "width": int(v.shape[1]), "dtype": entries[keys[word][comp]][1],
                   "mean_norm": float(v.float().norm(dim=1).mean())}
            for comp, v in sorted(emb.vectors.items())}})
    return rows, None


def _unet_naming(parsed) -> str | None:
    names = [s.name for s in parsed.groups if s.flat and s.component == "unet"]
    ldm = any(n.startswith(_LDM_BLOCKS) for n in names)
    diff = any(n.startswith(_DIFFUSERS_BLOCKS) for n in names)
    return {(True, False): "ldm", (False, True): "diffusers", (True, True): "mixed"}.get((ldm, diff))


def _components(file, parsed, entries, alphas, configs) -> dict:
    comps: dict[str, dict] = {}
    for slot, group in sorted(parsed.groups.items(), key=lambda kv: (kv[0].component, kv[0].name)):
        kind = _kind(file, group)
        if kind is None:
            continue
        shape, dtype = entries[group.keys.get("down") or _first_factor(group)]
        rank = _rank(kind, group, entries)
        if rank is None:  # a full diff, or LoKr without factors: nothing for alpha to divide
            alpha = None
        elif "alpha" in group.keys:
            alpha = alphas.get(group.keys["alpha"], float(rank))
        elif slot.component in configs:
            try:
                alpha = peft.alpha_from_config(file, configs[slot.component], [slot.name], rank)
            except AdapterError:
                alpha = float(rank)
        else:
            alpha = float(rank)
        c = comps.setdefault(slot.component, {"modules": 0, "ranks": Counter(), "alphas": Counter(),
                                              "conv_modules": 0, "dtypes": set(), "types": Counter()})
        c["modules"] += 1
        c["types"][("dora-" if "dora_scale" in group.keys else "") + kind] += 1
        if rank is not None:
            c["ranks"][rank] += 1
            c["alphas"][alpha] += 1
        c["conv_modules"] += (len(shape) == 4 and list(shape[2:]) != [1, 1]) or \
            any(r in group.keys for r in ("mid", "hada_t1", "lokr_t2"))
        c["dtypes"].add(dtype)
    out = {}
    for name, c in comps.items():
        rank = max(c["ranks"], key=lambda r: (c["ranks"][r], -r)) if c["ranks"] else None
        alpha = max(c["alphas"], key=lambda a: (c["alphas"][a], -a)) if c["alphas"] else None
        per_module = sorted(c["ranks"].elements())  # one entry per module: the rank distribution (resize)
        out[name] = {"modules": c["modules"], "rank": rank, "ranks": sorted(c["ranks"]), "alpha": alpha,
                     "rank_median": statistics.median(per_module) if per_module else None,
                     "alphas": sorted(c["alphas"]), "scale": alpha / rank if rank else None,
                     "conv_modules": c["conv_modules"], "dtypes": sorted(c["dtypes"]), "types": dict(c["types"])}
    return out


# Which tools read which file, from their sources (docs/formats.md and the README's table name them):
# verdict per (layout, type); a file gets, per tool, the worst verdict over the types it holds.
READERS = ("diffusers", "ComfyUI", "A1111", "kohya")
_VERDICTS = ("yes", "with LyCORIS", "as plain LoRA", "partly", "wrong result", "no", "not checked")  # best to worst
_YES = {t: "yes" for t in READERS}
_LYCO = {"diffusers": "no", "ComfyUI": "yes", "A1111": "yes", "kohya": "with LyCORIS"}
_RULES = {
    # kohya layout. Plain LoRA and LoCon conv pairs: A1111 network_lora.py, ComfyUI weight_adapter/lora.py,
    # diffusers' kohya converter, sd-scripts networks/lora.py (conv_dim).
    ("kohya", "lora"): _YES,
    # LyCORIS types: A1111 network_hada/lokr/full/norm.py and lora_mid in network_lora.py; ComfyUI loha.py, lokr.py,
    # lora.py; sd-scripts' networks/lora.py reads LoRA pairs only (the lycoris package plugs in as lycoris.kohya);
    # diffusers' kohya converter leaves their keys unconverted and refuses the file.
    **{("kohya", t): _LYCO for t in ("loha", "lokr", "tucker", "full", "norm")},
    # DoRA, input-axis magnitude [1, in]: what A1111 computes (its norm is always per input column) and ComfyUI
    # reads correctly; diffusers drops dora_scale keys with a warning; sd-scripts has no DoRA (LyCORIS dora_wd has).
    ("kohya", "dora-in"): {"diffusers": "as plain LoRA", "ComfyUI": "yes", "A1111": "yes", "kohya": "with LyCORIS"},
    # output-axis [out, 1]: A1111 takes the input-axis norm anyway, ComfyUI divides by ‖W‖ instead of ‖W + ΔW‖.
    ("kohya", "dora-out"): {"diffusers": "as plain LoRA", "ComfyUI": "wrong result", "A1111": "wrong result",
                            "kohya": "with LyCORIS"},
    # PEFT layout: diffusers' own (load_lora_weights; DoRA through PEFT's use_dora). ComfyUI reads "{}.lora_A/B.weight"
    # pairs (weight_adapter/lora.py) but its SD UNet key map (lora.py model_lora_keys_unet) knows "unet.…" names only
    # in the old attention-processor spelling ("attn1.processor.to_q"), so PEFT's "attn1.to_q" UNet pairs are not
    # loaded (text-encoder and other UNet modules are), and it has no name for lora_magnitude_vector. A1111
    # (networks.py load_network cuts a key at its first dot) and sd-scripts match kohya key names only.
    ("peft", "lora"): {"diffusers": "yes", "ComfyUI": "partly", "A1111": "no", "kohya": "no"},
    ("peft", "dora-out"): {"diffusers": "yes", "ComfyUI": "partly", "A1111": "no", "kohya": "no"},
    # the older diffusers spellings: diffusers' own loaders (lora_conversion_utils.py); the others not checked
    **{(layout, "lora"): {"diffusers": "yes"} for layout in ("diffusers", "diffusers-old")},
}


def readers(file_format: str, kinds: set[str]) -> dict[str, str]:
    """Per tool (diffusers, ComfyUI, A1111, kohya sd-scripts), how it reads a file of this layout holding these
    module kinds ("lora", "loha", ..., "dora-in", "dora-out"): one of ``_VERDICTS``."""
    layout = file_format if file_format in ("kohya", "peft", "diffusers", "diffusers-old") else "other"
    out = {}
    for tool in READERS:
        found = [_RULES.get((layout, k), {}).get(tool, "not checked") for k in kinds] or ["not checked"]
        out[tool] = max(found, key=_VERDICTS.index)
    return out


def _file_kinds(file, parsed, entries) -> set[str]:
    """The module kinds of a file for ``readers``: DoRA ones by their magnitude's axis ([1, in] is "in")."""
    kinds = set()
    for _, group in parsed.groups.items():
        kind = _kind(file, group)
        if kind is None:
            continue
        if "dora_scale" in group.keys:
            shape = list(entries[group.keys["dora_scale"]][0])
            kind = "dora-in" if len(shape) >= 2 and shape[0] == 1 and shape[1] > 1 else "dora-out"
        kinds.add(kind)
    return kinds


def _kind(file, group) -> str | None:
    """lora | loha | lokr | tucker | full for a module's keys; None for keys that make no module (a lone alpha,
    a broken LyCORIS module: loading reports those)."""
    from .lyco import is_lyco, kind_of

    if not is_lyco(group):
        return "lora" if "down" in group.keys else None
    try:
        return kind_of(file, group)
    except AdapterError:
        return None


def _first_factor(group) -> str:
    return sorted(k for r, k in group.keys.items() if r not in ("alpha", "dora_scale"))[0]


def _rank(kind: str, group, entries) -> int | None:
    """The dimension alpha divides by, from the header's shapes (``adapter.LycoModule.rank``'s rule)."""
    def first(role):
        shape = entries[group.keys[role]][0] if role in group.keys else None
        return int(shape[0]) if shape else None

    if kind in ("lora", "tucker"):
        return first("down") or 0
    if kind == "loha":
        return first("hada_w1_b")
    if kind == "lokr":
        return first("lokr_w2_b") or first("lokr_w1_b")
    return None


def training_summary(md: dict[str, str]) -> dict | None:
    """The training record of kohya (``ss_*``), ModelSpec and stylelora metadata; None if there is none."""
    if not any(k.startswith(("ss_", "stylelora.")) for k in md):
        return None
    started, finished = _num(md.get("ss_training_started_at")), _num(md.get("ss_training_finished_at"))
    freq = _json(md.get("ss_tag_frequency")) or {}
    tags: Counter = Counter()
    for per_dir in freq.values() if isinstance(freq, dict) else ():
        for tag, n in per_dir.items() if isinstance(per_dir, dict) else ():
            tags[str(tag).strip()] += _num(n, int) or 0
    resolution = md.get("modelspec.resolution")
    if not resolution and md.get("ss_resolution"):
        resolution = "x".join(p.strip() for p in md["ss_resolution"].strip("()").split(","))
    return {
        "base_model": md.get("ss_sd_model_name"),
        "output_name": md.get("ss_output_name"),
        "title": md.get("modelspec.title"),
        "steps": _num(md.get("ss_steps"), int),
        "max_train_steps": _num(md.get("ss_max_train_steps"), int),
        "epoch": _num(md.get("ss_epoch"), int),
        "num_train_images": _num(md.get("ss_num_train_images"), int),
        "resolution": resolution,
        "learning_rate": _num(md.get("ss_learning_rate")),
        "unet_lr": _num(md.get("ss_unet_lr")),
        "text_encoder_lr": _num(md.get("ss_text_encoder_lr")),
        "optimizer": md.get("ss_optimizer"),
        "lr_scheduler": md.get("ss_lr_scheduler"),
        "seed": _num(md.get("ss_seed"), int),
        "clip_skip": _num(md.get("ss_clip_skip"), int),
        "network_module": md.get("ss_network_module"),
        "network_dim": _num(md.get("ss_network_dim"), int),
        "network_alpha": _num(md.get("ss_network_alpha")),
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "duration_s": (finished - started) if started is not None and finished is not None else None,
        "dataset_dirs": _json(md.get("ss_dataset_dirs")),
        "top_tags": [[t, n] for t, n in sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:20]],
        "stylelora_version": md.get("stylelora.version"),
        "config": _json(md.get("stylelora.config")),
    }


def trigger_phrase(md: dict[str, str]) -> str | None:
    """An adapter's trigger words from its metadata (modelspec, else the training config), or None."""
    return _trigger(md)


def _trigger(md: dict[str, str]) -> str | None:
    if md.get("modelspec.trigger_phrase"):
        return md["modelspec.trigger_phrase"]
    config = _json(md.get("stylelora.config"))
    data = config.get("data") if isinstance(config, dict) else None
    trigger = data.get("trigger") if isinstance(data, dict) else None
    return trigger if isinstance(trigger, str) else None


def _merged_from(md: dict[str, str]) -> list | None:
    """The sources a merged file records (``modelspec.merged_from``: name, model hash, weight), or None."""
    rows = _json(md.get("modelspec.merged_from"))
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else None


def _shown_metadata(md: dict[str, str]) -> dict[str, str]:
    out = dict(md)
    thumb = out.get("modelspec.thumbnail")
    if thumb and len(thumb) > 80:
        out["modelspec.thumbnail"] = f"{thumb[:thumb.find(',') + 1] or thumb[:30]}... ({len(thumb)} characters)"
    return out


def describe(path, *, hashes: bool = True) -> dict:
    """Everything ``stylelora inspect`` reports about an adapter file (see docs/inspect-json.md)."""
    src = Path(path)
    file = weights_file(src)
    entries, alphas, emb_tensors, md = _read(file)
    parsed = parse_keys(k for k in entries if not embeddings.is_embedding_key(k))
    embs, emb_error = _embeddings(file, emb_tensors, entries)
    found, why = family_from_metadata(md)
    if found is None:
        found, why = family_from_keys(entries, parsed, lambda k: tuple(entries[k][0]))
    try:
        configs = peft.read_configs(file, md)
    except AdapterError:
        configs = {}
    components = _components(file, parsed, entries, alphas, configs)
    stored = (md.get("sshs_model_hash"), md.get("sshs_legacy_hash"))
    computed = model_hashes(file) if hashes and file.suffix.lower() not in PICKLE_SUFFIXES else (None, None)
    return {
        "schema_version": SCHEMA_VERSION,
        "file": str(file),
        "size_bytes": file.stat().st_size,
        "container": "pickle" if file.suffix.lower() in PICKLE_SUFFIXES else "safetensors",
        "format": parsed.layout,
        "unet_naming": _unet_naming(parsed),
        "family": found,
        "family_source": why or None,
        "num_tensors": len(entries),
        "num_modules": sum(c["modules"] for c in components.values()),
        "components": components,
        "supported": not parsed.unsupported and bool(components),
        "readers": readers(parsed.layout, _file_kinds(file, parsed, entries)) if components else None,
        "unsupported_keys": sorted(parsed.unsupported),
        "unrecognized_keys": sorted(parsed.unrecognized),
        "trigger": _trigger(md),
        "merged_from": _merged_from(md),
        "embeddings": embs,
        "embeddings_error": emb_error,
        "hashes": {
            "sshs_model_hash": stored[0],
            "sshs_legacy_hash": stored[1],
            "model_hash": computed[0],
            "legacy_hash": computed[1],
            "matches": None if None in stored or None in computed else stored == computed,
        },
        "training": training_summary(md),
        "metadata": _shown_metadata(md),
    }
