"""Merge several weighted adapters into one: exact (concatenated factors) or bounded rank (SVD of ΣΔW).

With cᵢ = wᵢ·αᵢ/rᵢ per module (FORMATS.md, Merging):
- exact: down = [sgn(cᵢ)·√|cᵢ|·Aᵢ] (rows), up = [√|cᵢ|·Bᵢ] (columns), alpha = rank = Σrᵢ, so up·down = Σ cᵢ BᵢAᵢ;
- rank k: ΔW = Σ cᵢ BᵢAᵢ, truncated SVD, up = U_k·S_k, down = Vh_k, alpha = k; the kept energy ΣS²_k/ΣS² is reported.
Summing factors instead (kohya's merge_lora.py) adds cross terms BᵢAⱼ; PEFT's "linear" mode is not ΣΔW either.
With block weights (``A.safetensors:0.7@INS``, stylelora/blocks.py) cᵢ also carries the module's block multiplier,
so the merge equals the blend with the same block weights.

Learnt token embeddings are kept, every source's, unscaled (a weight scales ΔW, not what a word means; a source
with both weights 0 is left out entirely). Two sources with the same word are an error unless one is renamed
(``rename``: ``[FILE:]OLD=NEW``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .adapter import Adapter, LoraModule, TokenEmbedding, common_alpha
from .blend import as_pair, compatible, file_digests, read_adapter
from .blocks import Blocks, multipliers, split_weight, unet_config_for
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
    origin: str = ""  # the file it was read from, for messages
    blocks: Blocks | None = None  # per-block multipliers (A1111 LoRA Block Weight), None: every block 1
    # (component, path) -> block multiplier, filled by ``with_multipliers`` (the blocks need the UNet layout)
    block_multipliers: dict | None = None

    def coeff(self, component: str, module: LoraModule, path: str | None = None) -> float:
        """cᵢ = wᵢ·mᵢ·αᵢ/rᵢ, with the UNet or text-encoder weight by component and mᵢ the block multiplier of
        module ``path`` (1 without block weights)."""
        weight = self.unet if component == "unet" else self.te
        if self.blocks is not None:
            if self.block_multipliers is None or path is None:
                raise AdapterError(f"{_label(self)} has block weights but its modules' blocks are not known "
                                   "(merge.with_multipliers)")
            weight = weight * self.block_multipliers[(component, path)]
        return weight * module.scale


@dataclass
class MergeResult:
    adapter: Adapter
    energy: dict[str, float] | None = None  # part -> retained fraction (SVD only)


def as_sources(items) -> list[Source]:
    """``[(Adapter, weight), ...]`` or ``Source``s -> Sources (weight: number, (unet, te), or with block weights
    as ``Blender.set`` takes them: ``(w, "INS")``, ``blocks.BlockWeight``)."""
    out = []
    for item in items:
        if isinstance(item, Source):
            out.append(item)
            continue
        adapter, weight = item
        plain, blocks = split_weight(weight, f"weight of {adapter.name!r}")
        unet, te = as_pair(plain, f"weight of {adapter.name!r}")
        out.append(Source(adapter, unet, te, adapter.metadata.get("sshs_model_hash") or adapter.content_hash(),
                          blocks=blocks))
    return out


def with_multipliers(sources: list[Source], pipe=None) -> list[Source]:
    """Sources with block weights get each module's block multiplier, the blocks numbered by ``pipe``'s UNet (or,
    without one, by the built-in tiny base or released architecture the adapter is for: ``blocks.unet_config_for``)."""
    for s in sources:
        if s.blocks is not None:
            s.block_multipliers = multipliers(s.adapter.modules, s.blocks, unet_config_for(s.adapter, pipe))
    return sources


def _grouped(sources: list[Source]) -> dict[tuple[str, str], list[tuple[float, LoraModule]]]:
    """(component, module path) -> [(cᵢ, module)] over the sources holding that module with cᵢ ≠ 0."""
    groups: dict[tuple[str, str], list[tuple[float, LoraModule]]] = {}
    for s in sources:
        for comp, mods in s.adapter.modules.items():
            for path, m in mods.items():
                c = s.coeff(comp, m, path)
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


def parse_rename(spec: str) -> tuple[str | None, str, str]:
    """``[FILE:]OLD=NEW`` -> (FILE or None, OLD, NEW). FILE is split at the last colon (Windows drive letters)."""
    head, colon, pair = spec.rpartition(":")
    old, eq, new = pair.partition("=")
    if not eq or not old or not new:
        raise ConfigError(f"--rename {spec!r}: expected [FILE:]OLD=NEW, e.g. --rename b.safetensors:inkwash=inkwash2")
    return (head if colon else None), old, new


def _label(s: Source) -> str:
    return s.origin or s.adapter.name


def _selects(selector: str, s: Source) -> bool:
    return selector in {s.origin, Path(s.origin).name, Path(s.origin).stem, s.adapter.name} - {""}


def merge_embeddings(sources: list[Source], rename=()) -> dict[str, TokenEmbedding]:
    """Every source's embeddings under their (possibly renamed) words; a word two sources use is an error naming
    both. A rename without FILE applies to every source holding OLD but the first."""
    renames = [parse_rename(r) if isinstance(r, str) else tuple(r) for r in rename]
    used = [False] * len(renames)
    out: dict[str, TokenEmbedding] = {}
    owner: dict[str, Source] = {}
    first: dict[str, Source] = {}  # the first source holding each original word
    for s in sources:
        if s.unet == 0.0 and s.te == 0.0:
            continue
        for word, emb in s.adapter.embeddings.items():
            first.setdefault(word, s)
            new = word
            for i, (sel, old, to) in enumerate(renames):
                if old == word and (_selects(sel, s) if sel is not None else first[word] is not s):
                    new, used[i] = to, True
            if new in out:
                raise AdapterError(f"{_label(owner[new])} and {_label(s)} both have a learnt embedding for "
                                   f"{new!r}; keep both by renaming one: --rename {_label(s)}:{word}=<new word>")
            out[new] = TokenEmbedding(new, dict(emb.vectors))
            owner[new] = s
    for (sel, old, to), done in zip(renames, used):
        if not done:
            where = f"in {sel}" if sel is not None else "in a second source"
            raise ConfigError(f"--rename {(sel + ':') if sel else ''}{old}={to}: no embedding {old!r} {where} to "
                              f"rename (sources: {', '.join(_label(s) for s in sources)})")
    return out


def _plain(sources: list[Source], pipe) -> list[Source]:
    """Sources whose LyCORIS / full-diff / DoRA modules are made LoRA pairs of the same ΔW (``resize.as_lora``:
    every nonzero singular value, so the merge stays exact). A DoRA module counts as its ΔW on the base weights
    (needs ``pipe``): the merged file equals applying each source alone on W₀ and summing, which is A1111's and
    ComfyUI's sequential result unless a DoRA source follows another source on the same layer."""
    from .resize import as_lora

    return [Source(as_lora(s.adapter, pipe), s.unet, s.te, s.model_hash, s.origin, s.blocks) if s.adapter.lyco()
            else s for s in sources]


def merge(items, *, rank: int | None = None, name: str = "merged", rename=(), pipe=None) -> MergeResult:
    """Merge weighted adapters: exact (rank = Σ ranks) or, with ``rank``, the best rank-``rank`` approximation.
    Token embeddings are kept from every source (``rename``: ``[FILE:]OLD=NEW`` strings for clashing words).
    LyCORIS / DoRA sources are first made plain LoRA pairs (``_plain``; DoRA needs ``pipe``, the base)."""
    sources = with_multipliers(_plain(as_sources(items), pipe), pipe)
    family, dtype = _check(sources)
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}")
    merged = Adapter(family=family, name=name, embeddings=merge_embeddings(sources, rename))
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
    _one_alpha(merged)
    order = [p for p in dict.fromkeys(PARTS.values()) if p in total]  # unet first, as printed
    energy = {p: (kept[p] / total[p] if total[p] > 0 else 1.0) for p in order} if rank is not None else None
    return MergeResult(merged, energy)


def _one_alpha(adapter: Adapter) -> None:
    """Give every module the same alpha (``common_alpha``: merged modules have different ranks, the sums of the
    sources'), folding each module's own scale into its factors: ΔW is unchanged."""
    mods = [m for comp in adapter.modules.values() for m in comp.values()]
    if not mods:
        return
    alpha = common_alpha(m.rank for m in mods)
    for comp in adapter.modules.values():
        for path, m in comp.items():
            if m.alpha == alpha:
                continue
            root = (m.alpha / alpha) ** 0.5  # (alpha/r)·(root·up)·(root·down) == (m.alpha/r)·up·down
            comp[path] = LoraModule(down=(m.down.float() * root).to(m.down.dtype),
                                    up=(m.up.float() * root).to(m.up.dtype), alpha=alpha)


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
        rows.append({"name": s.adapter.name, "sshs_model_hash": s.model_hash, "weight": weight,
                     **({"blocks": s.blocks.text()} if s.blocks is not None else {})})
    return json.dumps(rows)


def shared_metadata(sources: list[Source]) -> dict[str, str]:
    """Base-model facts every source agrees on (so the merged file still says what it is for)."""
    out = {}
    for key in CARRIED:
        values = {s.adapter.metadata.get(key) for s in sources}
        if len(values) == 1 and None not in values:
            out[key] = values.pop()
    return out


def merged_trigger(sources: list[Source], merged: Adapter) -> str:
    """The trigger words of every source in the blend (weight not 0), so the merged file still says which words
    call the style; a source's learnt word renamed in the merge is given under its new name."""
    from .formats.summary import trigger_phrase

    words: list[str] = []
    for s in sources:
        if s.unet == 0 and s.te == 0:
            continue
        for word in (w.strip() for w in (trigger_phrase(s.adapter.metadata) or "").split(",")):
            renamed_away = word in s.adapter.embeddings and word not in merged.embeddings
            if word and not renamed_away and word not in words:
                words.append(word)
    words += [w for w in merged.embeddings if w not in words]
    return ", ".join(words)


def load_sources(refs: list[LoraRef], *, folders=(), pipe=None) -> list[Source]:
    """Read the files behind ``refs`` (paths or names in ``folders``) into weighted Sources."""
    from .prompt import resolve

    out = []
    for ref in refs:
        path = resolve(ref, list(folders))
        adapter = read_adapter(path, pipe=pipe)
        model_hash = adapter.metadata.get("sshs_model_hash") or file_digests(path)[1]
        out.append(Source(adapter, ref.unet, ref.te, model_hash, origin=str(path), blocks=ref.blocks))
    return out


def merge_files(refs: list[LoraRef], output: str | Path, *, rank: int | None = None, folders=(), pipe=None,
                format: str = "kohya", rename=(), overwrite: bool = False, zip=None) -> tuple[Path, MergeResult]:
    """Merge adapter files into ``output`` (written atomically), recording the sources in its metadata; token
    embeddings are kept (and written to sidecar files too, see ``formats.save_adapter``). ``output`` is never one
    of the sources, and an existing file is replaced only with ``overwrite``. ``zip`` (a ``zipmerge.ZipOptions``):
    a ZipLoRA merge learnt on ``pipe`` (stylelora/zipmerge.py) instead of the exact one."""
    from .atomic import check_output
    from .formats import save_adapter, sidecar_paths
    from .prompt import resolve

    output = Path(output)
    if zip is not None:  # before any file is read: the combinations a ZipLoRA merge cannot do
        from .zipmerge import check_request

        blocked = [ref.source for ref in refs if ref.blocks is not None]
        if blocked:
            raise ConfigError(f"--method zip learns its own per-column coefficients; block weights (@BLOCKS) on "
                              f"{', '.join(blocked)} are for the exact merge: drop them or the --method zip")

        check_request(rank, rename, pipe)
    check_output(output, [resolve(ref, list(folders)) for ref in refs], overwrite=overwrite)
    sources = load_sources(refs, folders=folders, pipe=pipe)
    record = None
    if zip is not None:
        from .zipmerge import zip_merge

        zipped = zip_merge(sources, pipe, options=zip, name=output.stem)
        result, record = zipped.merge, zipped.record
    else:
        result = merge(sources, rank=rank, name=output.stem, rename=rename, pipe=pipe)
    # the sidecar embedding files written beside the output must not replace a source either
    for extra in sidecar_paths(output, result.adapter.embeddings).values():
        check_output(extra, [s.origin for s in sources], overwrite=True)
    if not result.adapter.num_modules():
        raise ConfigError("every source has weight 0: the merged adapter would be empty")
    metadata = {**shared_metadata(sources), "stylelora.version": __version__,
                "modelspec.merged_from": merged_from(sources), "modelspec.title": output.stem,
                "ss_output_name": output.stem,
                "stylelora_merge": "zip" if zip is not None else "exact" if rank is None else f"svd-rank-{rank}"}
    if record is not None:
        metadata["stylelora_zip"] = json.dumps(record)
    trigger = merged_trigger(sources, result.adapter)
    if trigger:
        metadata["modelspec.trigger_phrase"] = trigger
    if result.energy is not None:
        metadata["stylelora_merge_energy"] = json.dumps({k: round(v, 6) for k, v in result.energy.items()})
    path = save_adapter(result.adapter, output, format=format, metadata=metadata, pipe=pipe)
    return Path(path), result

