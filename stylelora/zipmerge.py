"""ZipLoRA merge (``stylelora merge A B --method zip``; Shah et al. 2023, arXiv 2311.13600).

Each source i's update ΔW_i = c_i·U_i·D_i (c_i = weight·α/r) gets a merger vector m_i with one coefficient per
column of ΔW (per input feature; for a conv, per column of the flattened [out, in·kh·kw] matrix), and the merged
update is ΔW = Σ_i ΔW_i·diag(m_i) = Σ_i c_i·U_i·(D_i·diag(m_i)). Scaling the columns of ΔW_i is scaling the
columns of its down factor, so the merge is exactly the concatenated LoRA of the sources with down_i → D_i·diag(m_i)
(stylelora/merge.py's exact merge, with the same sign-split factors and one alpha): a plain kohya file, and with
every m_i = 1 it is the exact merge bit for bit.

The m_i (initialised to 1) are learnt, as the paper does, by matching the merged model to each source: on source
i's own training images (noised at random timesteps) and captions (its trigger word in them), the merged model's
prediction should equal source i's alone, ‖ε_merged − ε_i‖² summed over the sources, plus λ·Σ_layers Σ_{i<j}
|⟨m_i, m_j⟩| / d (the paper's penalty on the merger vectors' similarity, divided by the layer's column count d
so λ weighs wide and narrow layers alike), which pushes the sources onto different columns. Defaults: 100 steps
(the paper's "about 100 gradient updates"), Adam with lr 0.01 and λ = 0.01 (the values this issue gives for the
paper; the public reimplementation mkshing/ziplora-pytorch also uses λ = 0.01 and 100 steps), batch 1.

The merged layers here are forward hooks holding the factors, not PEFT layers: PEFT's LoRA has no per-column
merger parameter, and a hook adds c_i·U_i·(D_i·diag(m_i))·x with m_i differentiable at the cost of one small
matmul per source. The sources' learnt trigger tokens are put into the tokenizers for the run (their prompts need
them) and taken out again; the merged file keeps them, as the exact merge does.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapter import Adapter, LoraModule
from .errors import AdapterError, ConfigError

log = logging.getLogger(__name__)

DEFAULTS = {"steps": 100, "lr": 0.01, "lam": 0.01, "batch_size": 1, "seed": 0}


@dataclass
class ZipOptions:
    steps: int = DEFAULTS["steps"]
    lr: float = DEFAULTS["lr"]
    lam: float = DEFAULTS["lam"]        # λ of the similarity penalty
    batch_size: int = DEFAULTS["batch_size"]
    seed: int = DEFAULTS["seed"]
    data: dict = field(default_factory=dict)  # source selector (file, name or stem) -> image folder
    progress: object = None  # called with {"step", "steps", "loss", "distill", "similarity"} after every step

    def check(self) -> None:
        if not 0 <= self.steps <= 100_000:
            raise ConfigError(f"--zip-steps must be in 0..100000, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--zip-lr must be a number > 0, got {self.lr}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"--zip-lambda must be a number >= 0, got {self.lam}")
        if self.batch_size < 1:
            raise ConfigError(f"--zip-batch-size must be >= 1, got {self.batch_size}")


@dataclass
class ZipResult:
    merge: object        # merge.MergeResult: the merged adapter
    record: dict         # what the run did (steps, lr, λ, losses at the first and last step): the file's metadata
    coefficients: dict   # (component, module path) -> {source index: m_i (fp32, one entry per column of ΔW)}


class _Column:
    """One source's factors in one layer, with its merger vector ``m`` (one entry per column of ΔW)."""

    def __init__(self, coeff: float, module: LoraModule, device):
        self.coeff = float(coeff)
        self.up = module.up.float().flatten(1).to(device)
        self.down = module.down.float().to(device)           # [r, in] or [r, in, kh, kw]
        self.m = torch.nn.Parameter(torch.ones(self.down[0].numel(), device=device))

    def scaled_down(self) -> torch.Tensor:
        return self.down * self.m.reshape(1, *self.down.shape[1:])


class _ZipLayer:
    """Forward hook of one base layer: adds Σ over the active sources of c_i·U_i·(D_i·diag(m_i))·x."""

    def __init__(self, layer: torch.nn.Module, where: str):
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            raise AdapterError(f"{where}: --method zip merges Linear and Conv2d layers, this one is "
                               f"{type(layer).__name__}")
        self.layer, self.where = layer, where
        self.columns: dict[int, _Column] = {}  # source index -> its factors here
        self.active: list[int] | None = None   # None: every source, merged; [i]: source i alone (m = 1)
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        x = inputs[0]
        extra = None
        for i, col in self.columns.items():
            if self.active is not None and i not in self.active:
                continue
            down = col.scaled_down() if self.active is None else col.down
            if isinstance(module, torch.nn.Linear):
                h = F.linear(F.linear(x.to(down.dtype), down), col.up)
            else:
                h = F.conv2d(x.to(down.dtype), down, stride=module.stride, padding=module.padding,
                             dilation=module.dilation)
                h = F.conv2d(h, col.up[:, :, None, None])
            h = col.coeff * h
            extra = h if extra is None else extra + h
        return output if extra is None else output + extra.to(output.dtype)


def _source_data(source, options: ZipOptions):
    """(DataConfig, folder) of the images source ``index`` was trained on: ``options.data`` (FILE=FOLDER), else
    the folder its stylelora metadata records; its trigger word, caption template and resolution from there."""
    from .config import DataConfig
    from .formats.summary import trigger_phrase

    label = source.origin or source.adapter.name
    md = source.adapter.metadata
    try:
        recorded = json.loads(md.get("stylelora.config") or "{}").get("data") or {}
    except (ValueError, AttributeError):
        recorded = {}
    given = [folder for sel, folder in options.data.items() if _selects_any(sel, source)]
    folder = given[0] if given else recorded.get("folder")
    if not folder:
        dirs = md.get("ss_dataset_dirs")
        hint = f" (its metadata names only folder names: {dirs})" if dirs else ""
        raise ConfigError(f"{label}: no training images known{hint}; --method zip learns on each source's own "
                          f"images: pass --data {Path(label).name}=FOLDER")
    if not Path(folder).expanduser().is_dir():
        raise ConfigError(f"{label}: its training folder {folder} does not exist; pass --data "
                          f"{Path(label).name}=FOLDER with the images it was trained on")
    names = {f.name for f in dataclasses.fields(DataConfig)}
    kept = {k: v for k, v in recorded.items() if k in names and k not in ("folder", "cache_dir", "reg_folder")}
    trigger = kept.get("trigger") or (trigger_phrase(md) or "").split(",")[0].strip() or None
    if not kept.get("resolution"):
        kept.pop("resolution", None)
    try:
        cfg = DataConfig(**{**kept, "folder": str(folder), "trigger": trigger, "caption_dropout": 0.0,
                            "random_crop": False})
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{label}: its recorded data settings do not load ({e}); pass --data "
                          f"{Path(label).name}=FOLDER") from e
    return cfg


def zip_merge(sources, pipe, *, options: ZipOptions | None = None, name: str = "merged"):
    """Learn the merger vectors of ``sources`` (``merge.Source``s or ``(Adapter, weight)`` pairs, two or more) on
    ``pipe``; returns a ``ZipResult`` whose adapter is the concatenated LoRA with down_i → D_i·diag(m_i)."""
    from . import data
    from .blend import insert_tokens, remove_tokens, encoders as token_encoders
    from .conditioning import unet_kwargs
    from .dataset import TrainingSet
    from .merge import MergeResult, _check, _factors, _module, _one_alpha, _plain, as_sources, merge_embeddings
    from .models import detect_family, stylelora_home

    options = options or ZipOptions()
    options.check()
    if len(sources) < 2:
        raise ConfigError("--method zip merges two or more adapters")
    unused = [sel for sel in options.data if not any(_selects_any(sel, s) for s in sources)]
    if unused:
        raise ConfigError(f"--data {unused[0]}=...: no source is {unused[0]!r} (sources: "
                          f"{', '.join(s.origin or s.adapter.name for s in sources)})")
    sources = _plain(as_sources(sources), pipe)  # LyCORIS / DoRA sources as exact LoRA pairs, as the exact merge does
    family_key, dtype = _check(sources)
    embeddings = merge_embeddings(sources)  # two sources with one trigger word: an error naming both
    family = detect_family(pipe)
    configs = [_source_data(s, options) for s in sources]

    parts = {"unet": pipe.unet, **{n: getattr(pipe, n) for n in family.text_encoders}}
    device = pipe.unet.device
    layers: dict[tuple[str, str], _ZipLayer] = {}
    inserted = []
    state = {n: (m.training, [p.requires_grad for p in m.parameters()]) for n, m in parts.items()}  # given back
    try:
        for emb in embeddings.values():  # the sources' learnt trigger words, for their prompts
            insert_tokens(pipe, [emb])
            inserted.append(emb)
        for n, m in parts.items():  # after the tokens: their new rows must not train either
            m.requires_grad_(False).eval()
        for i, s in enumerate(sources):
            for comp, mods in s.adapter.modules.items():
                if comp not in parts:
                    raise AdapterError(f"{s.origin or s.adapter.name} has {comp} weights but the base has no {comp}")
                for path, mod in mods.items():
                    c = s.coeff(comp, mod)
                    if c == 0.0:
                        continue
                    key = (comp, path)
                    if key not in layers:
                        try:
                            target = parts[comp].get_submodule(path)
                        except AttributeError:
                            raise AdapterError(f"{s.origin or s.adapter.name}: the base has no {comp} module "
                                               f"{path}") from None
                        layers[key] = _ZipLayer(target, f"{comp}.{path}")
                    layers[key].columns[i] = _Column(c, mod, device)
        cache_root = stylelora_home() / "cache"
        sets = []
        for s, cfg in zip(sources, configs):
            items = data.scan_folder(cfg.folder, trigger=cfg.trigger, caption_template=cfg.caption_template,
                                     repeats=cfg.repeats, default_repeats=cfg.default_repeats)
            tset = TrainingSet(items, cfg, pipe, cache_root=cache_root, cache_text=False, device=device,
                               weight_dtype=pipe.unet.dtype, family=family)
            tset.text.expand_tokens = bool(embeddings)
            tset.prepare()
            sets.append(tset)
        record = _learn(pipe, family, layers, sets, sources, options, unet_kwargs)
    finally:
        for layer in layers.values():
            layer.handle.remove()
        for emb in reversed(inserted):
            for comp in token_encoders(pipe):
                remove_tokens(pipe, emb, comp)
        for n, m in parts.items():
            m.train(state[n][0])
            for p, flag in zip(m.parameters(), state[n][1]):
                p.requires_grad_(flag)

    merged = Adapter(family=family_key, name=name, embeddings=embeddings)
    for (comp, path), layer in sorted(layers.items()):
        items = []
        for i, col in sorted(layer.columns.items()):
            m = col.m.detach().to("cpu", torch.float32)
            src = sources[i].adapter.modules[comp][path]
            down = (src.down.float() * m.reshape(1, *src.down.shape[1:])).to(src.down.dtype)
            items.append((col.coeff, LoraModule(down=down, up=src.up, alpha=src.alpha)))
        up, down, down_shape, up_tail = _factors(items, f"{comp}.{path}")
        merged.modules.setdefault(comp, {})[path] = _module(up, down, down_shape, up_tail, dtype)
    _one_alpha(merged)
    coefficients = {key: {i: col.m.detach().to("cpu", torch.float32).clone() for i, col in layer.columns.items()}
                    for key, layer in layers.items()}
    return ZipResult(MergeResult(merged), record, coefficients)


def _selects_any(selector: str, source) -> bool:
    from .merge import _selects

    return _selects(selector, source)


def _learn(pipe, family, layers, sets, sources, options: ZipOptions, unet_kwargs) -> dict:
    """The optimisation: ``options.steps`` Adam steps on the merger vectors; returns the run's record."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [col.m for layer in layers.values() for col in layer.columns.values()]
    optimizer = torch.optim.Adam(params, lr=options.lr)
    encoders = [getattr(pipe, n) for n in family.text_encoders]
    dtype = pipe.unet.dtype
    first = last = None

    def predict(tset, batch, noisy, t, indices, active):
        for layer in layers.values():
            layer.active = active
        cond = tset.text.encode(encoders, tset.text.tokenize(tset.captions(indices)))
        extra = unet_kwargs(family, cond, original_sizes=batch["original_sizes"], crops=batch["crops"],
                            target_sizes=batch["target_sizes"], dtype=dtype)
        return pipe.unet(noisy.to(dtype), t, cond["hidden"].to(dtype), **extra).sample.float()

    for step in range(options.steps):
        gen = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
        distill = []
        for i, tset in enumerate(sets):
            indices = [int(k) for k in torch.randint(0, len(tset.items), (options.batch_size,), generator=gen)]
            batch = tset.batch(indices, gen)
            latents = batch["latents"]
            noise = torch.randn(latents.shape, generator=gen).to(latents.device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
            t = t.to(latents.device)
            noisy = scheduler.add_noise(latents, noise, t)
            with torch.no_grad():
                target = predict(tset, batch, noisy, t, indices, [i])
            merged = predict(tset, batch, noisy, t, indices, None)
            distill.append(F.mse_loss(merged, target))
        penalty = similarity(layers)
        loss = sum(distill) + options.lam * penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        now = {"loss": float(loss.detach()), "distill": [float(d.detach()) for d in distill],
               "similarity": float(penalty.detach())}
        first = first or now
        last = now
        if options.progress:
            options.progress({"step": step + 1, "steps": options.steps, **now})
    for layer in layers.values():
        layer.active = None
    return {"method": "zip", "steps": options.steps, "lr": options.lr, "lambda": options.lam,
            "batch_size": options.batch_size, "seed": options.seed, "first": first, "last": last,
            "similarity": float(similarity(layers).detach()), "mean_m": _mean_m(layers, len(sources))}


def similarity(layers) -> torch.Tensor:
    """Σ over layers and source pairs of |⟨m_i, m_j⟩| / d (the paper's penalty, per column)."""
    terms = [(a.m * b.m).sum().abs() / a.m.numel() for layer in layers.values()
             for a, b in itertools.combinations(list(layer.columns.values()), 2)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _mean_m(layers, n: int) -> list[float]:
    sums, counts = [0.0] * n, [0] * n
    for layer in layers.values():
        for i, col in layer.columns.items():
            sums[i] += float(col.m.detach().sum())
            counts[i] += col.m.numel()
    return [s / c if c else 1.0 for s, c in zip(sums, counts)]


def check_request(rank, rename, pipe) -> None:
    """What ``merge --method zip`` cannot be combined with, answered before any file is read."""
    if rank is not None:
        raise ConfigError("--method zip writes the concatenated LoRA its coefficients make; --rank (SVD) is another "
                          "merge: leave one of them out (or `stylelora resize` the zip result)")
    if rename:
        raise ConfigError("--rename is not supported with --method zip: each source learns on prompts with its own "
                          "trigger word, so two sources cannot share one; retrain one with another trigger word")
    if pipe is None:
        raise ConfigError("--method zip learns on the base model the sources were trained for: pass --base")


def parse_data(specs) -> dict[str, str]:
    """``--data FILE=FOLDER`` (repeatable) -> {FILE: FOLDER}; the folder is split at the last '='."""
    out = {}
    for spec in specs:
        head, eq, folder = spec.rpartition("=")
        if not eq or not head or not folder:
            raise ConfigError(f"--data {spec!r}: expected FILE=FOLDER, e.g. --data ink.safetensors=styles/ink")
        out[head] = folder
    return out
