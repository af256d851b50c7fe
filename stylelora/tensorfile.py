"""The one reader of ``.safetensors`` files: ``safetensors.safe_open`` with errors that name the file and the fix.

safe_open checks the header, every tensor's dtype, shape and offsets, and that the data is fully covered; it never
unpickles anything. On top we cap the header size before anything is parsed, and when safe_open refuses a file
we say what is wrong in words (which key, past the end, not JSON, a pickle in disguise) instead of its error code.
Callers pass the error class their users expect (AdapterError for adapters, ModelError for base models, ...).

Everything stylelora reads (adapters, cache entries, checkpoints, toy weights) is floating point, so by default a
file holding a bool, integer or complex tensor is refused at open, naming the key and dtype, instead of failing
later in some torch op; fp8 tensors are returned upcast to float32 (exact), because torch implements almost no
operations (``isfinite``, matmul, ...) on fp8.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import AdapterError, StyleloraError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # real LoRA headers are a few hundred KB; refuse to parse more than this
_FIX = "Re-download or re-export it."
# bits per element of every safetensors dtype: a header entry's byte span must match its shape
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
               "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
               "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
_FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                    "float8_e8m0fnu") if hasattr(torch, n)}


def _pickle_hint(head: bytes) -> str:
    pickled = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")
    return " It looks like a PyTorch pickle; name it .pt to load its tensors safely." if pickled else ""


def header_length(path, *, error: type[StyleloraError] = AdapterError) -> int:
    """The length n of the JSON header (tensor data starts at byte 8 + n), checked against the cap and file size."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise error(f"{path}: not a safetensors file (only {size} bytes). {_FIX}")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise error(f"{path}: not a safetensors file or corrupt: header length {n} bytes exceeds the "
                    f"{MAX_HEADER_BYTES} byte limit.{_pickle_hint(head) or ' ' + _FIX}")
    if 8 + n > size:
        raise error(f"{path}: truncated or not a safetensors file: header of {n} bytes but the file has {size} "
                    f"bytes.{_pickle_hint(head) or ' ' + _FIX}")
    return n


def _explain(path: Path, n: int, reason: str) -> str:
    """Why safe_open refused ``path``, in words: re-read the (size-checked) header to name the bad part."""
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
        data_len = f.seek(0, 2) - 8 - n
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path}: corrupt safetensors header (not valid JSON: {e}). {_FIX}"
    if not isinstance(header, dict):
        return f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object). {_FIX}"
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        return f"{path}: corrupt safetensors header: __metadata__ is not an object. {_FIX}"
    for key, value in metadata.items():
        if not isinstance(value, str):
            return f"{path}: corrupt safetensors header: metadata key {key!r} is not a string. {_FIX}"
    spans = []
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            return (f"{path}: corrupt or truncated safetensors file: the entry for key {key!r} has invalid data "
                    f"offsets or points past the end of the file ({data_len} data bytes). {_FIX}")
        shape, dtype = info.get("shape"), info.get("dtype")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and dtype in _DTYPE_BITS):
            return (f"{path}: corrupt safetensors header: the entry for key {key!r} has an invalid shape {shape!r} "
                    f"or an unknown dtype {dtype!r}. {_FIX}")
        need = (math.prod(shape) * _DTYPE_BITS[dtype] + 7) // 8
        if offsets[1] - offsets[0] != need:
            return (f"{path}: corrupt safetensors header: key {key!r} ({dtype}, shape {shape}) needs {need} bytes "
                    f"but its entry spans {offsets[1] - offsets[0]}. {_FIX}")
        spans.append(offsets)
    spans.sort()
    ends = [0] + [end for _, end in spans]
    if [start for start, _ in spans] != ends[:-1] or ends[-1] != data_len:
        return (f"{path}: corrupt safetensors file: its tensors do not exactly cover the {data_len} data bytes "
                f"(overlaps, gaps or trailing bytes). {_FIX}")
    return f"{path}: corrupt safetensors file ({reason}). {_FIX}"


class TensorFile:
    """An open .safetensors file: metadata and tensor shapes come from the header; tensors are read on demand."""

    def __init__(self, path: Path, handle, error: type[StyleloraError]):
        self.path, self._f, self._error = path, handle, error
        self.metadata: dict[str, str] = dict(handle.metadata() or {})

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def entry(self, key: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype such as "F16") without reading the tensor's data."""
        s = self._f.get_slice(key)
        return list(s.get_shape()), s.get_dtype()

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key``; fp8 comes back as float32 (every fp8 value is exact in it)."""
        try:
            t = self._f.get_tensor(key)
        except Exception as e:  # noqa: BLE001 - safetensors/torch raise several types (e.g. a dtype torch lacks)
            raise self._error(f"{self.path}: cannot read tensor {key!r}: {e}") from None
        return t.float() if t.dtype in _FP8 else t

    def check_floats(self) -> None:
        """Refuse a file with any tensor that is not floating point, naming the first such key and its dtype."""
        for key in self.keys():
            dtype = self._f.get_slice(key).get_dtype()
            if dtype not in _FLOAT_DTYPES:
                raise self._error(f"{self.path}: tensor {key!r} has dtype {dtype}; only floating-point tensors "
                                  "(F16, BF16, F32, F64, F8) are accepted here. The file was not written for this "
                                  "use or is damaged; re-export it with floating-point weights.")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.keys()}


@contextmanager
def open_safetensors(path, *, error: type[StyleloraError] = AdapterError, floats_only: bool = True
                     ) -> Iterator[TensorFile]:
    """Open ``path`` with safe_open (CPU tensors), refusing a bad file with an ``error`` that names it.

    ``floats_only`` (the default) also refuses a file with a non-floating-point tensor (see the module's note)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    n = header_length(path, error=error)
    try:
        handle = safe_open(str(path), "pt", device="cpu")
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise error(_explain(path, n, reason)) from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e})") from None
    with handle:
        f = TensorFile(path, handle, error)
        if floats_only:
            f.check_floats()
        yield f


def read_safetensors(path, *, error: type[StyleloraError] = AdapterError, floats_only: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(all tensors, metadata) of a .safetensors file; fp8 tensors upcast to float32."""
    with open_safetensors(path, error=error, floats_only=floats_only) as f:
        return f.tensors(), f.metadata


def read_safetensors_metadata(path, *, error: type[StyleloraError] = AdapterError) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors file (header only; any dtypes)."""
    with open_safetensors(path, error=error, floats_only=False) as f:
        return f.metadata


def check_torch_archive(path, *, error: type[StyleloraError] = AdapterError) -> None:
    """Refuse a zip-format torch file (``.pt``/``.ckpt``/``.bin``) whose members unpack to far more than the file:
    ``torch.save`` stores members uncompressed, so a big ratio can only be a decompression bomb, and
    ``torch.load(weights_only=True)`` would inflate it all in memory before any check could run (a 2 MB file
    took 2.35 GB). Reads only the zip directory; legacy (non-zip) pickles pass through."""
    import zipfile

    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise error(f"{path}: damaged archive ({e}); re-download or re-export it") from None
    size = path.stat().st_size
    unpacked = sum(m.file_size for m in members)
    if unpacked > 2 * size + (1 << 20):
        raise error(f"{path}: its archive declares {unpacked:,} bytes unpacked from a {size:,}-byte file (torch.save "
                    "writes uncompressed archives): refused as a decompression bomb")
