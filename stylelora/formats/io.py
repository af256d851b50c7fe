"""Reading adapter files (safetensors through the one checked reader, pickles only as plain tensors) and kohya's
hashes. Writing goes through ``stylelora.atomic``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import AdapterError
from ..tensorfile import read_safetensors_metadata

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")


def weights_file(path) -> Path:
    """The file holding the weights: ``path`` itself, or the LoRA file inside a diffusers output folder."""
    path = Path(path)
    if path.is_dir():
        for name in DIFFUSERS_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (it has {', '.join(found)}; pass one of them)" if found else ""
        raise AdapterError(f"{path} is a folder without {DIFFUSERS_WEIGHT_NAMES[0]}{hint}")
    if not path.exists():
        raise AdapterError(f"adapter file {path} does not exist")
    return path


def read_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file, or of a pickle loaded with ``weights_only=True``."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    from ..tensorfile import open_safetensors

    with open_safetensors(path, floats_only=False) as f:
        check_dtypes(path, {k: f.entry(k)[1] for k in f.keys()})
        tensors, metadata = f.tensors(), f.metadata
    # an integer alpha (diffusers' convert_state_dict_to_kohya writes torch.tensor(rank), an I64 scalar) as float
    return {k: (v if v.is_floating_point() else v.to(torch.float32)) for k, v in tensors.items()}, metadata


_INTEGER_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}


def check_dtypes(path, dtypes: dict[str, str]) -> None:
    """Every tensor floating point (``tensorfile``'s rule), except a one-number integer ``.alpha``: diffusers'
    ``convert_state_dict_to_kohya`` writes each alpha as ``torch.tensor(rank)``, an I64 scalar."""
    from ..tensorfile import _FLOAT_DTYPES

    for key, dtype in dtypes.items():
        if dtype in _FLOAT_DTYPES or (key.endswith(".alpha") and dtype in _INTEGER_DTYPES):
            continue
        raise AdapterError(f"{path}: tensor {key!r} has dtype {dtype}; only floating-point tensors (F16, BF16, F32, "
                           "F64, F8; an integer alpha) are accepted here. The file was not written for this use or "
                           "is damaged; re-export it with floating-point weights.")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a pickle, never running code from it: only ``torch.load(weights_only=True)``, and only after
    its archive's sizes were checked (see ``tensorfile.check_torch_archive``)."""
    from ..tensorfile import check_torch_archive

    check_torch_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, zip errors ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: refused to load: it is not a plain tensor pickle, and stylelora never runs "
                           f"code from pickle files (torch.load weights_only=True said: {first}). Convert it to "
                           ".safetensors with the tool that made it.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise AdapterError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterError(f"{path}: not a dictionary of tensors (key {bad[0]!r})")
    return obj


def read_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` of an adapter file (empty for pickles); reads only the header."""
    path = weights_file(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return {}
    return read_safetensors_metadata(path)


# ------------------------------------------------------------------------------------------------- hashes
def _hashes_of_bytes(buf: bytes) -> tuple[str, str]:
    n = int.from_bytes(buf[:8], "little")
    model_hash = hashlib.sha256(buf[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(buf[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def serialize_for_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes kohya hashes: the file serialized with only its ``ss_*`` metadata."""
    from safetensors.torch import save

    return save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})


def model_hashes(path_or_bytes) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's ``precalculate_safetensors_hashes`` computes them.

    Bytes are taken as a complete serialization. A path is re-serialized with only its ``ss_*`` metadata first,
    so the result is what kohya would have stored; editing other metadata later changes neither hash.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return _hashes_of_bytes(bytes(path_or_bytes))
    tensors, metadata = read_tensors(weights_file(path_or_bytes))
    return _hashes_of_bytes(serialize_for_hash(tensors, metadata))
