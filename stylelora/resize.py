"""Resize an adapter: a new rank per module from the singular values of its ΔW, chosen by a rule or a global budget.

Per module, ΔW = (alpha/r)·up·down is never formed: QR of up [out, r] and of downᵀ [in·kh·kw, r] leaves an r×r
core R_up·R_downᵀ whose SVD gives ΔW's singular values σ and (through the Q factors) its singular vectors. The
resized module keeps the k largest: up = U_k·√(c·S_k), down = √(c·S_k)·V_kᵀ with c = k/alpha (the old scale is
folded in), so at weight 1 it is exactly the best rank-k approximation of the original ΔW at weight 1
(Eckart–Young). alpha is one value for the whole file, the most common new rank: alpha = rank (scale 1) wherever
the ranks agree, and no reader has to honour per-module alphas (diffusers does not, for SD1 kohya UNet keys).

Rules for k (all capped by ``max_rank``, never below 1):
- ``rank=K``: k = min(K, r).
- ``energy=E``: the smallest k with Σ_{i≤k} σᵢ² ≥ E²·Σσ² (the kept part has Frobenius norm ≥ E·‖ΔW‖).
- ``ratio=R``: every σ > σ_max / R.
- ``cumulative=C``: the smallest k with Σ_{i≤k} σᵢ ≥ C·Σσ.
- ``budget=BYTES``: one threshold τ on σ² over all modules: every module keeps its largest σ, then the other σ
  with σ² ≥ τ, τ as low as the budget allows. A kept rank costs (out + in·kh·kw) × itemsize bytes of factors
  (alphas, headers and token embeddings are not counted); ranks go where the energy is.
- ``max_error=ε`` (needs a base pipeline): the smallest global budget (bisection over τ) whose UNet output stays
  within ε of the original's (``unet_error``); with ``budget`` too, within that budget.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, LoraModule, LycoModule, TokenEmbedding, common_alpha
from .errors import ConfigError

PARTS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder"}
PROMPTS = ("a lighthouse on a cliff at dusk", "a portrait of an old man with a hat", "a city street in the rain",
           "a bowl of fruit on a wooden table")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


@dataclass
class Spectrum:
    """ΔW of one module as left·diag(s)·right (s descending; left [out, r'], right [r', in·kh·kw]), in float64."""

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor
    down_shape: tuple  # the original down's shape after the rank dim (in,) or (in, kh, kw)
    up_tail: tuple  # the original up's shape after the rank dim: () or (1, 1)
    dtype: torch.dtype
    rank: int  # the original rank

    @property
    def cost(self) -> int:
        """Bytes one kept rank takes in the file (a row of down plus a column of up)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return (self.left.shape[0] + self.right.shape[1]) * itemsize

    def module(self, k: int, alpha: float | None = None) -> LoraModule:
        """The best rank-k approximation as a LoRA module with ``alpha`` (default k, scale 1); the factors carry
        k/alpha so that (alpha/k)·up·down is that approximation whatever alpha is."""
        alpha = float(k) if alpha is None else float(alpha)
        root = (self.s[:k].clamp_min(0) * (k / alpha)).sqrt()
        up = (self.left[:, :k] * root).reshape(self.left.shape[0], k, *self.up_tail)
        down = (root[:, None] * self.right[:k]).reshape(k, *self.down_shape)
        return LoraModule(down=down.to(self.dtype).contiguous(), up=up.to(self.dtype).contiguous(), alpha=alpha)


def spectrum(m: LoraModule) -> Spectrum:
    """The SVD of ΔW = scale·up·down from its factors: QR of each factor, SVD of the small core."""
    up = m.up.detach().double().flatten(1) * m.scale
    down = m.down.detach().double().flatten(1)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    dtype = m.down.dtype if m.down.dtype.is_floating_point else torch.float32
    return Spectrum(q_up @ u, s, vh @ q_down.T, tuple(m.down.shape[1:]), tuple(m.up.shape[2:]), dtype, m.rank)


def module_spectrum(m: LoraModule | LycoModule, weight: torch.Tensor | None = None) -> Spectrum:
    """The SVD of any module's ΔW: a LoRA pair through its factors (``spectrum``); a LyCORIS / full-diff / DoRA
    module from its full ΔW (float64), DoRA's taken on ``weight`` (the base layer's W₀)."""
    if isinstance(m, LoraModule):
        return spectrum(m)
    delta = m.delta(torch.float64, weight=weight)
    u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
    dtypes = {t.dtype for t in m.tensors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return Spectrum(u, s, vh, tuple(delta.shape[1:]), (1, 1) if delta.dim() == 4 else (), dtype,
                    m.rank or int(s.numel()))


def dora_bases(adapter: Adapter, pipe=None) -> dict[tuple[str, str], torch.Tensor]:
    """W₀ (CPU float64) of every layer a DoRA module of ``adapter`` is on, from ``pipe`` (a pipeline or models.Base);
    a ConfigError naming a module when there are DoRA modules and no base."""
    need = [(c, p) for c, mods in adapter.modules.items() for p, m in mods.items()
            if isinstance(m, LycoModule) and m.dora]
    if not need:
        return {}
    if pipe is None:
        c, p = need[0]
        raise ConfigError(f"adapter {adapter.name!r} has {len(need)} DoRA module(s) (e.g. {c}.{p}): their weight "
                          "update depends on the base model's weights; pass --base (pipe=...)")
    from .lora import components

    parts = components(getattr(pipe, "pipe", pipe))
    out = {}
    for c, p in need:
        layer = parts[c].get_submodule(p)
        out[(c, p)] = getattr(layer, "base_layer", layer).weight.detach().to("cpu", torch.float64)
    return out


def spectra_of(adapter: Adapter, pipe=None) -> dict:
    """(component, path) -> Spectrum of every module (any type; DoRA needs ``pipe``)."""
    bases = dora_bases(adapter, pipe)
    return {(c, p): module_spectrum(m, bases.get((c, p))) for c in adapter.components()
            for p, m in adapter.modules[c].items() if not (isinstance(m, LycoModule) and m.kind == "norm")}


def numerical_rank(s: torch.Tensor) -> int:
    """The count of singular values above σ_max·1e-12 (at least 1): every rank a lossless conversion needs."""
    return max(1, int((s > s[0] * 1e-12).sum())) if s.numel() and float(s[0]) > 0 else 1


def bias_modules(adapter: Adapter) -> list[str]:
    """``component.path`` of every module with a part no LoRA can hold: a bias difference (``diff_b``, ``b_norm``)
    or a norm layer's weight difference (``w_norm``)."""
    return [f"{c}.{p}" for c, mods in adapter.modules.items() for p, m in mods.items()
            if isinstance(m, LycoModule) and (m.bias_delta() is not None or m.kind == "norm")]


def refuse_bias(adapter: Adapter) -> None:
    """A ConfigError when a module changes a bias: a LoRA written from it would silently lose that."""
    biased = bias_modules(adapter)
    if biased:
        raise ConfigError(f"adapter {adapter.name!r}: {len(biased)} module(s) change a bias or a norm layer "
                          f"(diff_b, w_norm/b_norm), e.g. {biased[0]}, which a LoRA cannot hold; blend or bake the "
                          "file instead, or make it a LoRA with stylelora convert --to lora, which leaves those "
                          "parts out and says so")


def as_lora(adapter: Adapter, pipe=None) -> Adapter:
    """The same adapter with every non-LoRA module (LoHa, LoKr, Tucker, full diff, DoRA) made a plain LoRA pair
    of the same ΔW (all its nonzero singular values: exact up to rounding); LoRA modules are kept as they are.
    A DoRA module's ΔW is taken on the base weight W₀ (``pipe``), what it adds when applied alone, at any weight
    (A1111 and ComfyUI scale DoRA's whole W' − W₀ by the multiplier)."""
    if not adapter.lyco():
        return adapter
    refuse_bias(adapter)
    bases = dora_bases(adapter, pipe)
    out = Adapter(family=adapter.family, name=adapter.name, metadata=dict(adapter.metadata),
                  embeddings=dict(adapter.embeddings))
    for comp in adapter.components():
        for path, m in adapter.modules[comp].items():
            if isinstance(m, LycoModule):
                sp = module_spectrum(m, bases.get((comp, path)))
                m = sp.module(numerical_rank(sp.s))
            out.modules.setdefault(comp, {})[path] = m
    return out


def to_lora(adapter: Adapter, *, rank: int | None = None, energy: float | None = None, pipe=None) -> ResizeResult:
    """Any adapter as a plain LoRA by the SVD of each module's ΔW: every nonzero singular value (exact), or at most
    ``rank`` per module, or the fewest that keep ``energy`` of ‖ΔW‖ (``resize``'s --energy rule). The result's
    ``energy`` per part gives the relative Frobenius error √(1 − energy). Bias differences (``diff_b``) have no
    LoRA form: they are left out and listed in ``method["dropped_bias"]``."""
    if rank is not None or energy is not None:
        check_rule(rank=rank, energy=energy)
    spectra = spectra_of(adapter, pipe)
    if not spectra:
        raise ConfigError(f"adapter {adapter.name!r} has no modules to convert")
    ranks = {}
    for key, sp in spectra.items():
        k = numerical_rank(sp.s)
        if rank is not None or energy is not None:
            k = min(k, module_rank(sp.s, rank=rank, energy=energy))
        ranks[key] = k
    method = {k: v for k, v in (("rank", rank), ("energy", energy)) if v is not None} or {"exact": True}
    dropped = bias_modules(adapter)
    if dropped:  # a LoRA holds weight updates only: say what is left out (method["dropped_bias"])
        method["dropped_bias"] = dropped
    result = build(adapter, spectra, ranks, method)
    for key in ("ss_network_module", "ss_network_args"):  # LyCORIS' "lycoris.kohya", {"algo": ...}: not any more
        result.adapter.metadata.pop(key, None)
    return result


def parse_size(value) -> int:
    """``"12M"`` / ``"1.5G"`` / ``"800k"`` / ``"4096"`` -> bytes (K/M/G are powers of 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"--budget {value!r}: expected a size in bytes such as 4096, 800K, 12M or 1.5G")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise ConfigError(f"--budget {value!r}: the size must be positive")
    return int(size)


# ------------------------------------------------------------------------------------------- choosing ranks
def check_rule(*, rank=None, energy=None, ratio=None, cumulative=None, budget=None, max_rank=None,
               max_error=None) -> None:
    """One rule (``budget`` may go with ``max_error``) with values in range; else a ConfigError saying the fix."""
    given = [n for n, v in (("--rank", rank), ("--energy", energy), ("--ratio", ratio), ("--cumulative", cumulative),
                            ("--budget", budget), ("--max-error", max_error)) if v is not None]
    if not given:
        raise ConfigError("resize needs a rule: --rank K, --energy E, --ratio R, --cumulative C, --budget SIZE or "
                          "--max-error EPS (with --base)")
    if len(given) > 1 and set(given) != {"--budget", "--max-error"}:
        raise ConfigError(f"give one rule, not {' and '.join(given)} (only --budget may go with --max-error)")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise ConfigError(f"--rank must be a whole number >= 1, got {rank}")
    if max_rank is not None and (int(max_rank) != max_rank or max_rank < 1):
        raise ConfigError(f"--max-rank must be a whole number >= 1, got {max_rank}")
    for flag, v in (("--energy", energy), ("--cumulative", cumulative)):
        if v is not None and not (0 < v <= 1):
            raise ConfigError(f"{flag} must be in (0, 1] (the fraction to keep), got {v}")
    if ratio is not None and not (math.isfinite(ratio) and ratio >= 1):
        raise ConfigError(f"--ratio must be >= 1 (keep σ > σ_max / R), got {ratio}")
    if max_error is not None and not (math.isfinite(max_error) and max_error > 0):
        raise ConfigError(f"--max-error must be > 0 (a relative error, e.g. 0.05), got {max_error}")


def module_rank(s: torch.Tensor, *, rank=None, energy=None, ratio=None, cumulative=None) -> int:
    """k for one module by a per-module rule (see the module docstring); at least 1."""
    n = int(s.numel())
    if rank is not None:
        k = int(rank)
    elif energy is not None or cumulative is not None:
        w = s.square() if energy is not None else s
        frac = energy ** 2 if energy is not None else cumulative
        cum = torch.cumsum(w, 0)
        # the first index whose cumulative sum reaches the target, +1 for a count (kohya adds one more: not here)
        k = int(torch.searchsorted(cum, frac * cum[-1] * (1 - 1e-12))) + 1 if float(cum[-1]) > 0 else 1
    elif ratio is not None:
        k = int((s > s[0] / ratio).sum()) if float(s[0]) > 0 else 1
    else:
        raise ConfigError("no per-module rule given")
    return max(1, min(k, n))


def global_order(spectra: dict, max_rank: int | None):
    """Every optional rank (beyond each module's first) as (σ², cost, key), largest σ² first."""
    extra = []
    for key, sp in spectra.items():
        top = sp.s.numel() if max_rank is None else min(sp.s.numel(), max_rank)
        extra.extend((float(sp.s[i]) ** 2, sp.cost, key) for i in range(1, top))
    extra.sort(key=lambda e: -e[0])  # stable: ties keep module order
    return extra


def ranks_for_count(spectra: dict, order: list, n: int) -> dict:
    """Each module's first rank plus the ``n`` largest optional ones: one global threshold τ = σ²ₙ."""
    ranks = {key: 1 for key in spectra}
    for _, _, key in order[:n]:
        ranks[key] += 1
    return ranks


def budget_count(spectra: dict, order: list, budget: int) -> int:
    """How many optional ranks fit in ``budget`` bytes after one rank per module (an error if that does not)."""
    floor = sum(sp.cost for sp in spectra.values())
    if floor > budget:
        raise ConfigError(f"--budget {budget} bytes is too small: one rank per module ({len(spectra)} modules) "
                          f"already needs {floor} bytes ({floor / 2**20:.3g} MiB); give at least that")
    used, n = floor, 0
    for _, cost, _ in order:  # a threshold, not a knapsack: stop at the first rank that does not fit
        if used + cost > budget:
            break
        used += cost
        n += 1
    return n


# ------------------------------------------------------------------------------------------- the result
@dataclass
class ResizeResult:
    adapter: Adapter
    before: dict[tuple[str, str], int]  # (component, path) -> original rank
    after: dict[tuple[str, str], int]  # -> new rank
    energy: dict[str, float]  # part -> Σσ²_kept / Σσ²
    bytes_before: dict[str, int]  # part -> bytes of LoRA factors
    bytes_after: dict[str, int]
    method: dict = field(default_factory=dict)
    error: float | None = None  # relative UNet-output error (with a base pipeline)

    def rows(self) -> list[dict]:
        """Per part: modules, ranks before/after as (min, median, max), energy kept, factor bytes before/after."""
        out = []
        for part in dict.fromkeys(PARTS[c] for c, _ in self.before):
            keys = [k for k in self.before if PARTS[k[0]] == part]
            span = lambda d: (min(d[k] for k in keys), statistics.median(d[k] for k in keys),  # noqa: E731
                              max(d[k] for k in keys))
            out.append({"part": part, "modules": len(keys), "before": span(self.before), "after": span(self.after),
                        "energy": self.energy[part], "bytes_before": self.bytes_before[part],
                        "bytes_after": self.bytes_after[part]})
        return out


def _bytes(m: LoraModule | LycoModule) -> int:
    if isinstance(m, LycoModule):
        return sum(t.numel() * t.element_size() for t in m.tensors.values())
    return m.down.numel() * m.down.element_size() + m.up.numel() * m.up.element_size()


def build(adapter: Adapter, spectra: dict, ranks: dict, method: dict) -> ResizeResult:
    """The resized adapter (same family, metadata and token embeddings) and its statistics."""
    out = Adapter(family=adapter.family, name=adapter.name, metadata=dict(adapter.metadata),
                  embeddings={w: TokenEmbedding(e.name, dict(e.vectors)) for w, e in adapter.embeddings.items()})
    kept: dict[str, float] = {}
    total: dict[str, float] = {}
    before_b: dict[str, int] = {}
    after_b: dict[str, int] = {}
    alpha = common_alpha(ranks.values())  # one alpha for every module, scales folded in (see common_alpha)
    for (comp, path), sp in spectra.items():
        k = ranks[(comp, path)]
        module = sp.module(k, alpha)
        out.modules.setdefault(comp, {})[path] = module
        part = PARTS[comp]
        energy = sp.s.square()
        kept[part] = kept.get(part, 0.0) + float(energy[:k].sum())
        total[part] = total.get(part, 0.0) + float(energy.sum())
        before_b[part] = before_b.get(part, 0) + _bytes(adapter.modules[comp][path])
        after_b[part] = after_b.get(part, 0) + _bytes(module)
    energy = {p: (kept[p] / total[p] if total[p] > 0 else 1.0) for p in total}
    before = {key: sp.rank for key, sp in spectra.items()}
    return ResizeResult(out, before, dict(ranks), energy, before_b, after_b, method)


def resize(adapter: Adapter, *, rank=None, energy=None, ratio=None, cumulative=None, budget=None, max_rank=None,
           max_error=None, pipe=None, prompts=PROMPTS, seed: int = 0) -> ResizeResult:
    """Resize ``adapter`` by one rule (module docstring). ``pipe`` (a base pipeline) adds the functional check:
    ``result.error`` is the relative change of the UNet output (``unet_error``); ``max_error`` needs it."""
    check_rule(rank=rank, energy=energy, ratio=ratio, cumulative=cumulative, budget=budget, max_rank=max_rank,
               max_error=max_error)
    if max_error is not None and pipe is None:
        raise ConfigError("--max-error needs --base: the error is measured on the base model's UNet")
    refuse_bias(adapter)
    budget_bytes = parse_size(budget) if budget is not None else None
    spectra = spectra_of(adapter, pipe)  # LyCORIS modules from their full ΔW (DoRA on the base's weights)
    if not spectra:
        raise ConfigError(f"adapter {adapter.name!r} has no modules to resize")
    method = {k: v for k, v in (("rank", rank), ("energy", energy), ("ratio", ratio), ("cumulative", cumulative),
                                ("budget_bytes", budget_bytes), ("max_rank", max_rank), ("max_error", max_error))
              if v is not None}
    if budget_bytes is None and max_error is None:
        ranks = {key: module_rank(sp.s, rank=rank, energy=energy, ratio=ratio, cumulative=cumulative)
                 for key, sp in spectra.items()}
        if max_rank is not None:
            ranks = {key: min(k, max_rank) for key, k in ranks.items()}
        result = build(adapter, spectra, ranks, method)
        if pipe is not None:
            result.error = unet_error(pipe, adapter, [result.adapter], prompts=prompts, seed=seed)[0]
        return result
    order = global_order(spectra, max_rank)
    top = budget_count(spectra, order, budget_bytes) if budget_bytes is not None else len(order)
    if max_error is None:
        result = build(adapter, spectra, ranks_for_count(spectra, order, top), method)
        if pipe is not None:
            result.error = unet_error(pipe, adapter, [result.adapter], prompts=prompts, seed=seed)[0]
        return result
    return _search(adapter, spectra, order, top, max_error, method, pipe, prompts, seed)


def _search(adapter, spectra, order, top, max_error, method, pipe, prompts, seed) -> ResizeResult:
    """Bisection over the global threshold (the count n of optional ranks kept): the smallest n whose UNet error is
    within ``max_error``. The error falls as ranks are added (not strictly, so this finds a boundary, not a proof
    of the global minimum); the chosen result's own error is always checked."""
    with ErrorProbe(pipe, adapter, prompts=prompts, seed=seed) as probe:
        def attempt(n):
            r = build(adapter, spectra, ranks_for_count(spectra, order, n), method)
            r.error = probe.error(r.adapter)
            return r

        best = attempt(top)
        if best.error > max_error:
            within = f" within --budget ({top} optional ranks)" if "budget_bytes" in method else ""
            raise ConfigError(f"no resize{within} keeps the UNet output within --max-error {max_error}: the "
                              f"largest gives {best.error:.4g}; raise --max-error or --budget/--max-rank")
        lo, hi = 0, top  # invariant: attempt(hi) is within max_error
        while lo < hi:
            mid = (lo + hi) // 2
            r = attempt(mid)
            if r.error <= max_error:
                hi, best = mid, r
            else:
                lo = mid + 1
    best.method = {**method, "optional_ranks": hi}
    return best


# ------------------------------------------------------------------------------------------- functional check
class ErrorProbe:
    """UNet outputs on fixed noisy latents and prompts, with adapters fused through ``blend.Blender``.

    Relative error of a candidate = ‖ε_candidate − ε_original‖ / ‖ε_original − ε_base‖: the share of the
    original adapter's effect on the UNet output that the candidate gets wrong (0 = identical; 1 = as far off as
    leaving the adapter out). Both adapters are fused at weight 1 (UNet and text encoders); the pipe is left as
    it was found.
    """

    def __init__(self, pipe, original: Adapter, *, prompts=PROMPTS, seed: int = 0):
        from .blend import Blender

        self.base = pipe
        self.pipe = getattr(pipe, "pipe", pipe)
        self.blender = Blender(pipe)
        self.original = original
        trigger = original.metadata.get("modelspec.trigger_phrase")
        self.prompts = [f"{trigger}, {p}" if trigger else p for p in prompts]
        self.seed = seed
        self._inputs = None

    def __enter__(self):
        with torch.no_grad():
            self.reference = self.output(None)
            self.original_out = self.output(self.original)
        self.scale = float((self.original_out - self.reference).norm())
        return self

    def __exit__(self, *exc):
        self.blender.reset()
        for name in list(self.blender.names):
            self.blender.unload(name)

    def error(self, candidate: Adapter) -> float:
        with torch.no_grad():
            diff = float((self.output(candidate) - self.original_out).norm())
        return diff / self.scale if self.scale > 0 else (0.0 if diff == 0 else math.inf)

    def _latents(self, unet):
        if self._inputs is None:
            g = torch.Generator().manual_seed(self.seed)
            size = min(int(unet.config.sample_size), 32)  # a real model's 64/128 latents cost much, say no more
            n = len(self.prompts)
            latents = torch.randn(n, unet.config.in_channels, size, size, generator=g)
            steps = torch.tensor([int(1000 * (i + 0.5) / n) for i in range(n)])
            self._inputs = (latents, steps, size)
        return self._inputs

    def output(self, adapter: Adapter | None) -> torch.Tensor:
        from .conditioning import TextConditioning, unet_kwargs

        pipe = self.pipe
        family = self.blender_family()
        if adapter is not None:
            name = self.blender.load(adapter, name="__resize_probe__", weight=1.0)
        try:
            cond = TextConditioning(pipe, family)
            cond.expand_tokens = True
            encoders = [getattr(pipe, te) for te in family.text_encoders]
            encoded = cond.encode(encoders, cond.tokenize(self.prompts))
            unet = pipe.unet
            latents, steps, size = self._latents(unet)
            device, dtype = unet.device, unet.dtype
            n = latents.shape[0]
            px = torch.tensor([[size * 8, size * 8]] * n)
            extra = unet_kwargs(family, encoded, original_sizes=px, crops=torch.zeros(n, 2), target_sizes=px,
                                dtype=dtype)
            out = unet(latents.to(device, dtype), steps.to(device), encoded["hidden"].to(dtype), **extra).sample
            return out.float().cpu()
        finally:
            if adapter is not None:
                self.blender.unload(name)

    def blender_family(self):
        from .models import Family, detect_family

        return Family.from_key(self.blender.family) or detect_family(self.pipe)


def unet_error(pipe, original: Adapter, candidates: list[Adapter], *, prompts=PROMPTS, seed: int = 0) -> list[float]:
    """Relative UNet-output error of each candidate against ``original`` (see ``ErrorProbe``)."""
    with ErrorProbe(pipe, original, prompts=prompts, seed=seed) as probe:
        return [probe.error(c) for c in candidates]


# ------------------------------------------------------------------------------------------- files
def resize_metadata(result: ResizeResult, source: Path, output: Path) -> dict[str, str]:
    """What the resized file records: the method, the source's hashes, and kohya's "dynamic" for mixed ranks."""
    from . import __version__
    from .blend import file_digests

    sha, model_hash = file_digests(source)
    record = {"method": result.method, "source": source.name, "source_sha256": sha,
              "source_sshs_model_hash": result.adapter.metadata.get("sshs_model_hash") or model_hash,
              "energy": {k: round(v, 6) for k, v in result.energy.items()}}
    if result.error is not None:
        record["unet_relative_error"] = round(result.error, 6)
    md = {"stylelora.resize": json.dumps(record, sort_keys=True), "stylelora.version": __version__,
          "modelspec.title": output.stem, "ss_output_name": output.stem}
    if len(set(result.after.values())) > 1:  # as kohya's resize_lora.py writes it (save keeps "dynamic")
        md["ss_network_dim"] = "dynamic"  # (alpha is one value for all modules, see ``build``)
    return md


def output_format(source: Path) -> str:
    """The input's own layout when it is one we write (kohya or PEFT), else kohya."""
    from .formats import describe

    layout = describe(source, hashes=False)["format"]
    return layout if layout in ("kohya", "peft") else "kohya"


def resize_file(source, output, *, format: str | None = None, pipe=None, overwrite: bool = False,  # noqa: A002
                **rule) -> tuple[Path, ResizeResult]:
    """Resize the adapter file ``source`` into ``output`` (written atomically, sidecar embedding files beside it).
    ``rule``: the keyword arguments of ``resize``; ``pipe`` (a base pipeline or ``models.Base``) resolves module
    names against it and enables the functional check."""
    from .atomic import check_output
    from .formats import load_adapter, save_adapter, sidecar_paths

    source, output = Path(source), Path(output)
    if output.suffix.lower() != ".safetensors":
        raise ConfigError(f"-o must name a .safetensors file, got {output}")
    check_rule(**rule)
    check_output(output, [source], overwrite=overwrite)
    live = getattr(pipe, "pipe", pipe)
    adapter = load_adapter(source, pipe=live)
    result = resize(adapter, pipe=pipe, **rule)
    for extra in sidecar_paths(output, result.adapter.embeddings).values():
        check_output(extra, [source], overwrite=True)
    path = save_adapter(result.adapter, output, format=format or output_format(source),
                        metadata=resize_metadata(result, source, output), pipe=live)
    return Path(path), result
