"""Content-keyed disk cache for VAE latents and text-encoder outputs.

A latent's key covers everything that changes it: the image bytes, bucket, crop, flip, the VAE's weights and
config, and the dtype. An edited image gets a new key (re-encoded); an unchanged one is read back. Entries are
single safetensors files written atomically, so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import atomic_path
from .tensorfile import read_safetensors

CACHE_VERSION = "2"  # 2: latent entries carry original size and crop (SDXL micro-conditioning)


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's config and weights: the identity of a VAE or text encoder for cache keys."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


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

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            out, _ = read_safetensors(p)
        except Exception:  # noqa: BLE001 - a damaged entry is just a miss; it is rewritten
            return None
        self.stats.hits += 1
        return out

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.stats.misses += 1
        p = self.path(key)
        # No fsync: a cache entry lost in a crash is recomputed (a damaged one reads as a miss).
        with atomic_path(p) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
