"""Content-keyed disk cache for VAE latents and text-encoder outputs.

A latent's key covers everything that changes it: the image bytes, bucket, crop, flip, the VAE's weights and
config, and the dtype. An edited image gets a new key (re-encoded); an unchanged one is read back. Entries are
single safetensors files written atomically, so a killed run never leaves a half-written entry.

A file's name is not trusted: each entry carries its key and a sha256 of its tensors in its metadata, checked on
read, so an entry copied or renamed over another, rewritten with other tensors, or of the wrong shape is reported
and re-encoded instead of silently trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_path
from .tensorfile import read_safetensors

CACHE_VERSION = "3"  # 2: latent entries carry original size and crop (SDXL micro-conditioning); 3: key + checksum

log = logging.getLogger(__name__)


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's config and weights: the identity of a VAE or text encoder for cache keys."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(p for item in module.state_dict().items() for p in _stored(*item)):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _stored(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, plain tensor) pairs for a state-dict entry: a tensor subclass (torchao's int8 weights of a
    --quantize-base int8-torchao text encoder) by the inner tensors it stores, which can be viewed as bytes."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return [(name, t)]
    inner = [(f"{name}.{n}", getattr(t, n, None)) for n in t.__tensor_flatten__()[0]]
    return [p for n, u in inner if isinstance(u, torch.Tensor) for p in _stored(n, u)]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes (in name order): what an entry's checksum covers."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    damaged: int = 0


class TensorCache:
    """A folder of ``<key[:2]>/<key>.safetensors`` entries, each a dict of tensors."""

    def __init__(self, root: Path, kind: str):
        self.dir = Path(root) / kind
        self.stats = CacheStats()

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str, check: Callable[[dict[str, torch.Tensor]], str | None] | None = None
            ) -> dict[str, torch.Tensor] | None:
        """The entry stored under ``key``, or None when there is none or it is damaged (then with a warning; the
        caller recomputes it and ``put`` replaces it). ``check(tensors)`` may name what else is wrong with an
        entry that is intact but unusable (e.g. "mean has shape ... , expected ...")."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            out, meta = read_safetensors(p)
        except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed, whatever the reader says
            return self._damaged(p, f"unreadable: {e}")
        if meta.get("stylelora.cache_key") != key:
            return self._damaged(p, "it belongs to another key (copied or renamed over this one)"
                                 if meta.get("stylelora.cache_key") else "it carries no cache key")
        if meta.get("stylelora.sha256") != tensors_digest(out):
            return self._damaged(p, "its tensors do not match its checksum (rewritten or corrupted)")
        problem = check(out) if check else None
        if problem:
            return self._damaged(p, problem)
        self.stats.hits += 1
        return out

    def _damaged(self, path: Path, why: str) -> None:
        self.stats.damaged += 1
        log.warning("cache entry %s is damaged (%s); encoding it again", path, why)
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.stats.misses += 1
        p = self.path(key)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {"stylelora.cache_key": key, "stylelora.sha256": tensors_digest(tensors)}
        # No fsync: a cache entry lost in a crash is recomputed (a damaged one is reported and recomputed).
        with atomic_path(p) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
