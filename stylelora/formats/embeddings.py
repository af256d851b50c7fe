"""Learnt token embeddings (``Adapter.embeddings``) in adapter files and in standalone embedding files.

Inside an adapter file:

- kohya layout: AUTOMATIC1111's bundled-embedding keys, which its Lora extension loads with the LoRA and which
  trigger when the prompt names the word: ``bundle_emb.<word>.string_to_param.*`` ``[N, width]`` for one text
  encoder (SD1/SD2), ``bundle_emb.<word>.clip_l`` / ``.clip_g`` for SDXL. A1111 splits the key at its first two
  dots, so a word cannot contain a dot. Read back also: a single other vector name (``bundle_emb.<word>.emb_params``),
  as A1111 accepts any one-tensor embedding.
- PEFT layout: ``stylelora_emb.<word>.text_encoder`` (and ``.text_encoder_2``). diffusers' ``load_lora_weights``
  refuses a file whose keys do not all contain ``lora`` ("Invalid LoRA checkpoint"), which ``bundle_emb.*`` keys do
  not; ``stylelora_emb.*`` keys do, start with no component prefix, and so are ignored by it (checked in
  tests/test_embeddings_files.py).

Beside the adapter, ``save_adapter`` writes a standalone embedding file per word ("sidecar") for tools that do not
read bundled embeddings (ComfyUI, diffusers' ``load_textual_inversion``): ``emb_params`` ``[N, width]`` for one text
encoder, ``clip_l`` + ``clip_g`` for SDXL, the word in the metadata (``stylelora.token``). One embedding:
``<stem>_emb.safetensors``; several: ``<stem>_<word>_emb.safetensors`` each.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..adapter import TokenEmbedding
from ..atomic import write_bytes
from ..errors import AdapterError
from . import validate
from .io import read_tensors

KOHYA_PREFIX = "bundle_emb."
PEFT_PREFIX = "stylelora_emb."
PREFIXES = (KOHYA_PREFIX, PEFT_PREFIX)
# SDXL's key per text encoder, in A1111 bundles and standalone files alike
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SDXL_COMPONENTS = {v: k for k, v in SDXL_KEYS.items()}
ONE_TE_KEY = "emb_params"  # the key A1111 and ComfyUI read in a one-text-encoder embedding file
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
METADATA_TOKEN = "stylelora.token"


def is_embedding_key(key: str) -> bool:
    return key.startswith(PREFIXES)


def split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(embedding tensors, everything else)."""
    emb = {k: v for k, v in tensors.items() if is_embedding_key(k)}
    return emb, {k: v for k, v in tensors.items() if k not in emb}


def _two_encoders(emb: TokenEmbedding) -> bool:
    return "text_encoder_2" in emb.vectors


def kohya_keys(emb: TokenEmbedding) -> dict[str, str]:
    """component -> the key this embedding's vectors get in a kohya (A1111) file."""
    if _two_encoders(emb):
        return {c: f"{KOHYA_PREFIX}{emb.name}.{SDXL_KEYS[c]}" for c in emb.vectors}
    return {c: f"{KOHYA_PREFIX}{emb.name}.string_to_param.*" for c in emb.vectors}


def peft_keys(emb: TokenEmbedding) -> dict[str, str]:
    return {c: f"{PEFT_PREFIX}{emb.name}.{c}" for c in emb.vectors}


def to_state_dict(embeddings: dict[str, TokenEmbedding], fmt: str) -> dict[str, torch.Tensor]:
    """The embedding tensors of an adapter file in layout ``fmt`` ("kohya" or "peft")."""
    out: dict[str, torch.Tensor] = {}
    for emb in embeddings.values():
        keys = kohya_keys(emb) if fmt == "kohya" else peft_keys(emb)
        for comp, key in keys.items():
            out[key] = emb.vectors[comp].detach().cpu().contiguous()
    return out


def _component(file, key: str, word: str, vec: str, peft: bool, single: bool) -> str:
    if peft:
        if vec not in TEXT_ENCODERS:
            raise AdapterError(f"{file}: {key}: unknown text encoder {vec!r} (expected {' or '.join(TEXT_ENCODERS)})")
        return vec
    if vec in SDXL_COMPONENTS:
        return SDXL_COMPONENTS[vec]
    if vec.startswith("string_to_param.") or single:  # A1111 reads any lone tensor as a one-encoder embedding
        return "text_encoder"
    raise AdapterError(f"{file}: {key}: embedding {word!r} has vector {vec!r} among others; expected "
                       "string_to_param.* (SD1/SD2) or clip_l and clip_g (SDXL)")


def from_tensors(file, tensors: dict[str, torch.Tensor], *, widths: dict[str, int] | None = None,
                 where: str = "", keys_out: dict | None = None) -> dict[str, TokenEmbedding]:
    """Embeddings from the ``bundle_emb.*`` / ``stylelora_emb.*`` tensors of a file, checked (``widths``: the
    token-embedding width per text encoder of the model, when known; ``where`` names that model in errors).
    ``keys_out`` receives word -> {component: file key}."""
    by_word: dict[str, dict[str, str]] = {}
    for key in sorted(tensors):
        prefix = next(p for p in PREFIXES if key.startswith(p))
        word, dot, vec = key[len(prefix):].partition(".")
        if not dot or not vec:
            raise AdapterError(f"{file}: {key}: expected {prefix}<word>.<vector name>")
        by_word.setdefault(word, {})[key] = vec
    out: dict[str, TokenEmbedding] = {}
    for word, keys in by_word.items():
        vectors: dict[str, torch.Tensor] = {}
        names: dict[str, str] = {}
        for key, vec in keys.items():
            comp = _component(file, key, word, vec, key.startswith(PEFT_PREFIX), len(keys) == 1)
            if comp in names:
                raise AdapterError(f"{file}: {names[comp]} and {key} both hold embedding {word!r} for {comp}")
            t = tensors[key]
            vectors[comp] = t.unsqueeze(0) if t.dim() == 1 else t  # a 1-D vector is one token, as A1111 reads it
            names[comp] = key
        emb = TokenEmbedding(word, vectors)
        validate.check_embedding(file, emb, names, widths, where)
        out[word] = emb
        if keys_out is not None:
            keys_out[word] = names
    return out


# ---------------------------------------------------------------------------------------- standalone files
def sidecar_paths(path, embeddings) -> dict[str, Path]:
    """word -> the standalone embedding file written beside the adapter at ``path``."""
    path = Path(path)
    words = list(embeddings)
    if len(words) == 1:
        return {words[0]: path.with_name(f"{path.stem}_emb.safetensors")}
    return {w: path.with_name(f"{path.stem}_{w}_emb.safetensors") for w in words}


def is_embedding_file(path) -> bool:
    """Whether ``path`` is a standalone embedding file (a sidecar, or any A1111/ComfyUI-style ``emb_params`` /
    ``clip_l``+``clip_g`` file) rather than an adapter: adapter listings skip these. Reads the header only (once per
    file version); a file that cannot be read is left to the adapter loader, which names what is wrong with it."""
    if not str(path).lower().endswith(".safetensors"):
        return False
    try:
        st = Path(path).stat()
    except OSError:
        return False
    return _is_embedding_file(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _is_embedding_file(path: str, size: int, mtime_ns: int) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable: not ours to judge here
        return False
    return METADATA_TOKEN in meta or (bool(keys) and keys <= {ONE_TE_KEY, *SDXL_KEYS.values()})


def sidecars_of(path) -> list[Path]:
    """The sidecar embedding files ``write_sidecars`` wrote beside the adapter at ``path`` (found by name and by
    the ``stylelora.adapter`` entry in their header, so an unrelated file of a similar name is never picked)."""
    from safetensors import safe_open

    path = Path(path)
    out = []
    for cand in sorted(path.parent.glob(f"{path.stem}_*emb.safetensors")):
        try:
            with safe_open(str(cand), "pt") as f:
                if (f.metadata() or {}).get("stylelora.adapter") == path.name:
                    out.append(cand)
        except Exception:  # noqa: BLE001 - unreadable: not a sidecar we wrote
            continue
    return out


def sidecar_tensors(emb: TokenEmbedding) -> dict[str, torch.Tensor]:
    if _two_encoders(emb):
        return {SDXL_KEYS[c]: v.detach().cpu().contiguous() for c, v in emb.vectors.items()}
    return {ONE_TE_KEY: emb.vectors["text_encoder"].detach().cpu().contiguous()}


def write_sidecars(path, embeddings: dict[str, TokenEmbedding], family: str | None) -> list[Path]:
    """Write each embedding as a standalone file beside the adapter at ``path`` (atomically, durable)."""
    from safetensors.torch import save

    written = []
    for word, dest in sidecar_paths(path, embeddings).items():
        emb = embeddings[word]
        md = {METADATA_TOKEN: word, "stylelora.num_tokens": str(emb.num_tokens),
              "stylelora.tokens": json.dumps(emb.tokens()), "stylelora.adapter": Path(path).name}
        if family:
            md["stylelora.family"] = family
        written.append(write_bytes(dest, save(sidecar_tensors(emb), md), fsync=True))
    return written


def load_embedding(path, *, name: str | None = None, widths: dict[str, int] | None = None) -> TokenEmbedding:
    """A standalone embedding file: ``emb_params`` (A1111/ComfyUI, one text encoder), ``clip_l`` + ``clip_g`` (SDXL),
    a diffusers ``{token: tensor}`` file, or a file of ``bundle_emb.*`` keys (``name`` picks one of several).

    The word is ``name``, else the file's ``stylelora.token`` metadata, else a diffusers file's key, else the file
    name's stem.
    """
    file = Path(path)
    if not file.is_file():
        raise AdapterError(f"embedding file {file} does not exist")
    tensors, md = read_tensors(file)
    bundled, rest = split(tensors)
    if bundled and not rest:
        found = from_tensors(file, bundled, widths=widths)
        pick = name or md.get(METADATA_TOKEN) or (next(iter(found)) if len(found) == 1 else None)
        if pick not in found:
            raise AdapterError(f"{file}: holds embeddings {', '.join(sorted(found))}; name the one to load")
        return found[pick]
    word = name or md.get(METADATA_TOKEN)
    if set(tensors) == set(SDXL_COMPONENTS):
        vectors = {SDXL_COMPONENTS[k]: t for k, t in tensors.items()}
        keys = {SDXL_COMPONENTS[k]: k for k in tensors}
    elif len(tensors) == 1:
        key, t = next(iter(tensors.items()))
        if key != ONE_TE_KEY:  # diffusers' learned_embeds: the key is the token
            word = word or key
        vectors, keys = {"text_encoder": t}, {"text_encoder": key}
    else:
        raise AdapterError(f"{file}: not an embedding file: expected one tensor ({ONE_TE_KEY}) or clip_l and clip_g, "
                           f"found keys {validate.short_list(sorted(tensors))}")
    vectors = {c: (t.unsqueeze(0) if t.dim() == 1 else t) for c, t in vectors.items()}
    emb = TokenEmbedding(word or file.stem.removesuffix("_emb"), vectors)
    validate.check_embedding(file, emb, keys, widths)
    return emb


def widths_of_pipe(pipe) -> dict[str, int]:
    """Token-embedding width per text encoder of a loaded pipeline."""
    out = {}
    for comp in TEXT_ENCODERS:
        model = getattr(pipe, comp, None)
        if model is not None:
            out[comp] = int(model.get_input_embeddings().weight.shape[1])
    return out


def widths_of_table(table) -> dict[str, int]:
    """Token-embedding width per text encoder of a module table: the input width of its attention projections."""
    out = {}
    for comp in TEXT_ENCODERS:
        ct = table.components.get(comp) if table is not None else None
        shape = next((s for p, s in (ct.shapes.items() if ct else ()) if p.endswith("self_attn.q_proj")), None)
        if shape is not None:
            out[comp] = int(shape[1])
    return out


def check_family(file, embeddings: dict[str, TokenEmbedding], family, keys_of=kohya_keys) -> None:
    """Each embedding has vectors for exactly the family's text encoders (SDXL: both; A1111 needs clip_l and
    clip_g)."""
    if family is None:
        return
    want = set(family.text_encoders)
    for emb in embeddings.values():
        if set(emb.vectors) != want:
            keys = ", ".join(keys_of(emb).values())
            raise AdapterError(f"{file}: embedding {emb.name!r} ({keys}) has vectors for "
                               f"{', '.join(sorted(emb.vectors))} but {family.spec.name} models have "
                               f"{', '.join(sorted(want))}")
