"""Merge several weighted adapters into one: exact (concatenated factors) or bounded rank (SVD of ΣΔW).

With cᵢ = wᵢ·αᵢ/rᵢ per module (FORMATS.md, Merging):
- exact: down = [sgn(cᵢ)·√|cᵢ|·Aᵢ] (rows), up = [√|cᵢ|·Bᵢ] (columns), alpha = rank = Σrᵢ, so up·down = Σ cᵢ BᵢAᵢ;
- rank k: ΔW = Σ cᵢ BᵢAᵢ, truncated SVD, up = U_k·S_k, down = Vh_k, alpha = k; the kept energy ΣS²_k/ΣS² is reported.
Summing factors instead (kohya's merge_lora.py) adds cross terms BᵢAⱼ; PEFT's "linear" mode is not ΣΔW either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .adapter import Adapter, LoraModule
from .blend import as_pair, compatible, file_digests, read_adapter
from .errors import AdapterError, ConfigError
from .prompt import LoraRef

# base-model metadata a merge keeps when all sources agree; training details (steps, lr, tags) do not carry over
CARRIED = ("ss_sd_model_name", "ss_base_model_version", "ss_v2", "ss_resolution", "ss_clip_skip", "stylelora.family",
           "modelspec.architecture", "modelspec.resolution", "modelspec.prediction_type")
PARTS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder"}  # component -> energy part


@dataclass
class Source:
    """One weighted input of a merge."""

    adapter: Adapter
    unet: float
    te: float
    model_hash: str = ""

    def coeff(self, component: str, module: LoraModule) -> float:
        """cᵢ = wᵢ·αᵢ/rᵢ, with the UNet or text-encoder weight by component."""
        return (self.unet if component == "unet" else self.te) * module.scale


@dataclass
class MergeResult:
    adapter: Adapter
    energy: dict[str, float] | None = None  # part -> retained fraction (SVD only)


def as_sources(items) -> list[Source]:
    """``[(Adapter, weight), ...]`` or ``Source``s -> Sources (weight: number or (unet, te))."""
    out = []
    for item in items:
        if isinstance(item, Source):
            out.append(item)
            continue
        adapter, weight = item
        unet, te = as_pair(weight, f"weight of {adapter.name!r}")
        out.append(Source(adapter, unet, te, adapter.metadata.get("sshs_model_hash") or adapter.content_hash()))
    return out


def _grouped(sources: list[Source]) -> dict[tuple[str, str], list[tuple[float, LoraModule]]]:
    """(component, module path) -> [(cᵢ, module)] over the sources holding that module with cᵢ ≠ 0."""
    groups: dict[tuple[str, str], list[tuple[float, LoraModule]]] = {}
    for s in sources:
        for comp, mods in s.adapter.modules.items():
            for path, m in mods.items():
                c = s.coeff(comp, m)
                if c != 0.0:
                    groups.setdefault((comp, path), []).append((c, m))
    return groups


def _check(sources: list[Source]) -> tuple[str | None, torch.dtype]:
    if not sources:
        raise ConfigError("merge needs at least one adapter")
    families = {s.adapter.family for s in sources if s.adapter.family}
    fam = next(iter(sorted(families)), None)
    for s in sources:
        if not compatible(s.adapter.family, fam):
            raise AdapterError(f"cannot merge {s.adapter.name!r} ({s.adapter.family}) with adapters for {fam}: "
                               "all sources must be made for the same model family")
    dtypes = [m.down.dtype for s in sources for mods in s.adapter.modules.values() for m in mods.values()]
    dtype = torch.float32
    if dtypes and all(d == dtypes[0] for d in dtypes) and dtypes[0].is_floating_point:
        dtype = dtypes[0]  # keep fp16/bf16 inputs fp16/bf16, mixed inputs become fp32
    return fam, dtype


def _factors(items: list[tuple[float, LoraModule]], where: str) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
    """Concatenated sign-split factors (fp32, 2-D): up [out, R], down [R, in·k·k]; plus the original shapes."""
    downs, ups = [], []
    shape = items[0][1].down.shape[1:]
    for c, m in items:
        if m.down.shape[1:] != shape or m.up.shape[0] != items[0][1].up.shape[0]:
            raise AdapterError(f"{where}: sources disagree on the layer shape ({tuple(items[0][1].down.shape)} vs "
                               f"{tuple(m.down.shape)})")
        root = abs(c) ** 0.5
        downs.append((m.down.float() * (root if c > 0 else -root)).flatten(1))
        ups.append(m.up.float().flatten(1) * root)
    return torch.cat(ups, dim=1), torch.cat(downs), tuple(shape), tuple(items[0][1].up.shape[2:])


def merge(items, *, rank: int | None = None, name: str = "merged") -> MergeResult:
    """Merge weighted adapters: exact (rank = Σ ranks) or, with ``rank``, the best rank-``rank`` approximation."""
    sources = as_sources(items)
    family, dtype = _check(sources)
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}")
    merged = Adapter(family=family, name=name)
    kept: dict[str, float] = {}
    total: dict[str, float] = {}
    for (comp, path), group in sorted(_grouped(sources).items()):
        up, down, down_shape, up_tail = _factors(group, f"{comp}.{path}")
        if rank is None:
            module = _module(up, down, down_shape, up_tail, dtype)
        else:
            module, k_energy, t_energy = _truncate(up, down, rank, down_shape, up_tail, dtype)
            part = PARTS.get(comp, comp)
            kept[part] = kept.get(part, 0.0) + k_energy
            total[part] = total.get(part, 0.0) + t_energy
            if module is None:
                continue
        merged.modules.setdefault(comp, {})[path] = module
    order = [p for p in dict.fromkeys(PARTS.values()) if p in total]  # unet first, as printed
    energy = {p: (kept[p] / total[p] if total[p] > 0 else 1.0) for p in order} if rank is not None else None
    return MergeResult(merged, energy)


def _module(up, down, down_shape, up_tail, dtype) -> LoraModule:
    r = down.shape[0]
    return LoraModule(down=down.reshape(r, *down_shape).to(dtype).contiguous(),
                      up=up.reshape(up.shape[0], r, *up_tail).to(dtype).contiguous(), alpha=float(r))


def _truncate(up, down, k, down_shape, up_tail, dtype):
    """Truncated SVD of up·down without forming it: QR of each factor, SVD of the small R_up·R_downᵀ core."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    energy = s.square()
    k = min(k, int((s > s[0] * 1e-12).sum()) if s.numel() and s[0] > 0 else 0)
    if k == 0:
        return None, 0.0, float(energy.sum())
    new_up = (q_up @ u[:, :k]) * s[:k]
    new_down = vh[:k] @ q_down.T
    return _module(new_up.float(), new_down.float(), down_shape, up_tail, dtype), float(energy[:k].sum()), \
        float(energy.sum())


def merged_from(sources: list[Source]) -> str:
    """JSON for ``modelspec.merged_from``: each source's name, model hash and weight(s)."""
    rows = []
    for s in sources:
        weight = s.unet if s.unet == s.te else {"unet": s.unet, "text_encoder": s.te}
        rows.append({"name": s.adapter.name, "sshs_model_hash": s.model_hash, "weight": weight})
    return json.dumps(rows)


def shared_metadata(sources: list[Source]) -> dict[str, str]:
    """Base-model facts every source agrees on (so the merged file still says what it is for)."""
    out = {}
    for key in CARRIED:
        values = {s.adapter.metadata.get(key) for s in sources}
        if len(values) == 1 and None not in values:
            out[key] = values.pop()
    return out


def load_sources(refs: list[LoraRef], *, folders=(), pipe=None) -> list[Source]:
    """Read the files behind ``refs`` (paths or names in ``folders``) into weighted Sources."""
    from .prompt import resolve

    out = []
    for ref in refs:
        path = resolve(ref, list(folders))
        adapter = read_adapter(path, pipe=pipe)
        model_hash = adapter.metadata.get("sshs_model_hash") or file_digests(path)[1]
        out.append(Source(adapter, ref.unet, ref.te, model_hash))
    return out


def merge_files(refs: list[LoraRef], output: str | Path, *, rank: int | None = None, folders=(), pipe=None,
                format: str = "kohya") -> tuple[Path, MergeResult]:
    """Merge adapter files into ``output`` (written atomically), recording the sources in its metadata."""
    from .formats import save_adapter

    output = Path(output)
    sources = load_sources(refs, folders=folders, pipe=pipe)
    result = merge(sources, rank=rank, name=output.stem)
    if not result.adapter.num_modules():
        raise ConfigError("every source has weight 0: the merged adapter would be empty")
    metadata = {**shared_metadata(sources), "stylelora.version": __version__,
                "modelspec.merged_from": merged_from(sources), "modelspec.title": output.stem,
                "ss_output_name": output.stem,
                "stylelora_merge": "exact" if rank is None else f"svd-rank-{rank}"}
    if result.energy is not None:
        metadata["stylelora_merge_energy"] = json.dumps({k: round(v, 6) for k, v in result.energy.items()})
    path = save_adapter(result.adapter, output, format=format, metadata=metadata, pipe=pipe)
    return Path(path), result

