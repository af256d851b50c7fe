"""Reading and writing adapter files: a checked safetensors header, safe pickles, atomic saves, kohya's hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import AdapterError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # real LoRA headers are a few hundred KB; refuse to parse more than this
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


def read_header(path) -> tuple[int, dict, dict[str, str]]:
    """(header length, tensor entries, metadata) of a .safetensors file, validated before anything is trusted."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        pickled = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")
        hint = " It looks like a PyTorch pickle; name it .pt to load its tensors safely." if pickled else ""
        if n > MAX_HEADER_BYTES:
            raise AdapterError(f"{path}: not a safetensors file or corrupt: header length {n} bytes exceeds the "
                               f"{MAX_HEADER_BYTES} byte limit.{hint}")
        if 8 + n > size:
            raise AdapterError(f"{path}: truncated or not a safetensors file: header of {n} bytes but the file "
                               f"has {size} bytes.{hint}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterError(f"{path}: corrupt safetensors header: __metadata__ is not an object")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise AdapterError(f"{path}: corrupt safetensors header: metadata key {key!r} is not a string")
    data_len = size - 8 - n
    for key, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and 0 <= info["data_offsets"][0] <= info["data_offsets"][1] <= data_len)
        if not ok:
            raise AdapterError(f"{path}: corrupt safetensors header: entry for key {key!r} is invalid or points "
                               "past the end of the file")
    return n, header, metadata


def read_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file, or of a pickle loaded with ``weights_only=True``."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    metadata = read_header(path)[2]
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: unreadable safetensors file: {e}") from None
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a pickle, never running code from it: only ``torch.load(weights_only=True)``."""
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
    return dict(read_header(path)[2])


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


# ------------------------------------------------------------------------------------------------ writing
def atomic_write(path, data: bytes) -> Path:
    """Write ``data`` to a temp file in the target folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = (path.stat().st_mode & 0o777) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - not possible on some platforms / filesystems
        pass
    return path
