"""Saving an ``Adapter``: kohya (default) or PEFT layout, checked first, with kohya's hashes, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter import Adapter, LycoModule
from ..atomic import write_bytes
from ..errors import AdapterError
from ..models import Family, detect_family, family_with_component
from . import embeddings, kohya, peft, validate
from .arch import ArchTable, table_from_pipe
from .io import model_hashes, serialize_for_hash
from .load import family_for_key

FORMATS = ("kohya", "peft")
# written fresh on every save; never carried over from the adapter's previous file
_STALE = ("sshs_model_hash", "sshs_legacy_hash", peft.METADATA_KEY, "stylelora.embeddings")


def _check(adapter: Adapter, path: Path, table: ArchTable | None) -> None:
    """Refuse to write what loading would refuse: bad pairs, bad alphas, modules the base model lacks."""
    for comp in adapter.components():
        for mod_path, m in adapter.modules[comp].items():
            key = f"{comp}.{mod_path}"
            if isinstance(m, LycoModule):  # written as the file had it (kohya layout only)
                _check_lyco(path, key, m, table)
                continue
            validate.check_pair(path, f"{key} (down)", m.down, f"{key} (up)", m.up)
            validate.check_alpha(path, f"{key} (alpha)", float(m.alpha))
            if table is None:
                continue
            ct = table.components.get(comp)
            if ct is None or mod_path not in ct.shapes:
                raise AdapterError(f"{path}: module {key} is not in {table.source}")
            validate.fit_shape(path, key, mod_path, m, ct.shapes[mod_path])


def _check_lyco(path: Path, key: str, m: LycoModule, table: ArchTable | None) -> None:
    for role, t in m.tensors.items():
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{path}: {key} ({role}) must be finite floating-point values")
    comp, _, mod_path = key.partition(".")
    ct = table.components.get(comp) if table is not None else None
    shape = (ct.shapes.get(mod_path) or ct.norms.get(mod_path, ())) if ct is not None else ()
    if table is not None and tuple(shape) != tuple(m.shape):
        raise AdapterError(f"{path}: module {key} ({m.kind}, weight {list(m.shape)}) does not fit {table.source}")


def _check_embeddings(adapter: Adapter, path: Path, family: Family | None, pipe) -> None:
    widths = embeddings.widths_of_pipe(pipe) if pipe is not None else None
    for word, emb in adapter.embeddings.items():
        if emb.name != word:
            raise AdapterError(f"{path}: embedding stored under {word!r} is named {emb.name!r}")
        names = {c: f"embedding {word} ({c})" for c in emb.vectors}
        validate.check_embedding(path, emb, names, widths, "the base model")
    embeddings.check_family(path, adapter.embeddings, family, lambda e: {c: c for c in e.vectors})


def _metadata(adapter: Adapter, extra: dict[str, str] | None, fmt: str, family: Family | None) -> dict[str, str]:
    md = dict(adapter.metadata)
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map strings to strings; {key!r} has a {type(value).__name__}")
        md[key] = value
    for key in _STALE:  # a kohya file with diffusers' alpha metadata would make diffusers refuse it
        md.pop(key, None)
    summary = kohya.summary_metadata(adapter, family)
    for key in ("ss_network_dim", "ss_network_alpha"):  # always the tensors' own values ...
        if key in summary and not ((extra or {}).get(key) == "dynamic"):  # ... or kohya's "dynamic" (resize)
            md[key] = summary[key]
    if "ss_network_args" in summary:  # conv LoRA: kohya's conv_dim / conv_alpha
        try:
            args = json.loads(md.get("ss_network_args") or "{}")
        except ValueError:
            args = {}
        md["ss_network_args"] = json.dumps({**(args if isinstance(args, dict) else {}),
                                            **json.loads(summary["ss_network_args"])})
    for key in ("ss_network_module", "ss_v2", "ss_base_model_version"):
        if key in summary:
            md.setdefault(key, summary[key])
    md.setdefault("ss_network_args", "{}")
    md["stylelora.format"] = fmt
    if family is not None:
        md["stylelora.family"] = family.key
    return md


def save_adapter(adapter: Adapter, path, *, format: str = "kohya", family: Family | None = None,  # noqa: A002
                 metadata: dict[str, str] | None = None, pipe=None) -> Path:
    """Write ``adapter`` to ``path`` (a .safetensors file) atomically and return the path.

    kohya layout (default): ``lora_unet_…``/``lora_te_…`` (``lora_te1_``/``lora_te2_`` and ldm UNet names for SDXL),
    with ``.alpha`` tensors. PEFT layout: ``unet.…lora_A.weight``, alpha in ``lora_adapter_metadata``. ``metadata``
    is added to the adapter's own; ``sshs_model_hash``/``sshs_legacy_hash`` are computed as kohya does.
    With ``pipe``, module names come from (and are checked against) the live model.
    Token embeddings go into the file (``bundle_emb.*`` / ``stylelora_emb.*``, see ``embeddings``) and into a
    standalone embedding file per word beside it (``embeddings.sidecar_paths``).
    """
    if format not in FORMATS:
        raise AdapterError(f"unknown adapter format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_dir():
        raise AdapterError(f"{path} is a folder; give a file name such as {path / 'adapter.safetensors'}")
    if not adapter.num_modules():
        raise AdapterError(f"{path}: the adapter has no modules; nothing to save")
    if pipe is not None:
        family = family or detect_family(pipe)
    family = family or family_for_key(adapter.family)
    if family is None and (adapter.modules.get("text_encoder_2")  # only SDXL has a second text encoder
                           or any("text_encoder_2" in e.vectors for e in adapter.embeddings.values())):
        family = family_with_component("text_encoder_2")
    table = table_from_pipe(pipe, family) if pipe is not None else None
    _check(adapter, path, table)
    _check_embeddings(adapter, path, family, pipe)
    md = _metadata(adapter, metadata, format, family)
    if adapter.embeddings:  # word -> token count, for tools that read the header only
        md["stylelora.embeddings"] = json.dumps({w: e.num_tokens for w, e in sorted(adapter.embeddings.items())})
    try:
        if format == "kohya":
            tensors = kohya.to_state_dict(adapter, family, table)
        else:
            tensors, md[peft.METADATA_KEY] = peft.to_state_dict(adapter, table)
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None
    tensors.update(embeddings.to_state_dict(adapter.embeddings, format))
    md["sshs_model_hash"], md["sshs_legacy_hash"] = model_hashes(serialize_for_hash(tensors, md))
    from safetensors.torch import save

    write_bytes(path, save(tensors, md), fsync=True)  # durable: an adapter can be hours of training
    if adapter.embeddings:  # for tools that do not read bundled embeddings (ComfyUI, diffusers)
        embeddings.write_sidecars(path, adapter.embeddings, family.key if family else adapter.family)
    return path
