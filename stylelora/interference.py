"""How much two adapters' updates interfere (``stylelora blend-report``): per module, from the low-rank factors.

For one module with ΔW_a = s_a·U_a·D_a and ΔW_b = s_b·U_b·D_b (U = up [out, r], D = down [r, in·kh·kw], s = α/r):

- ``cosine``  ⟨ΔW_a, ΔW_b⟩ / (‖ΔW_a‖‖ΔW_b‖), signed: the two updates push the same weights the same way (+1), the
  opposite way (−1), or unrelated ways (0).
- ``input``   ‖ΔW_a·ΔW_bᵀ‖ / √(‖ΔW_aᵀΔW_a‖‖ΔW_bᵀΔW_b‖), in [0, 1]: how much the two read the same input directions
  (row spaces). 0 means ΔW_b is zero on every input ΔW_a responds to, and the other way round — what orthogonal
  slots (``train --slot``) guarantee.
- ``output``  ‖ΔW_aᵀ·ΔW_b‖ / √(‖ΔW_aΔW_aᵀ‖‖ΔW_bΔW_bᵀ‖), in [0, 1]: how much they write the same output directions
  (column spaces); the issue's ‖ΔW_aᵀΔW_b‖ / (‖ΔW_a‖‖ΔW_b‖) normalised so an adapter against itself is 1 at any
  rank (‖ΔWᵀΔW‖_F ≤ ‖ΔW‖²_F, with equality only at rank 1). By Cauchy–Schwarz on ⟨ΔW_aΔW_aᵀ, ΔW_bΔW_bᵀ⟩ it is
  at most 1, and it is 1 for the same adapter (or one a multiple of the other).

All three come from r×r products of the factors (UᵀU, D·Dᵀ, U_aᵀU_b, D_a·D_bᵀ), never from ΔW itself:
⟨ΔW_a, ΔW_b⟩ = s_a·s_b·Σ (U_aᵀU_b)∘(D_a·D_bᵀ), ‖ΔW_a·ΔW_bᵀ‖² = s_a²s_b²·tr(H_a·N·H_b·Nᵀ) with H = UᵀU,
N = D_a·D_bᵀ, and ‖ΔW_aᵀ·ΔW_b‖² = s_a²s_b²·tr(G_a·M·G_b·Mᵀ) with G = D·Dᵀ, M = U_aᵀU_b. A LyCORIS module (LoHa,
LoKr, full...) is compared through its dense ΔW (U = ΔW, D = I; a DoRA magnitude is left out: it needs the base).

A block's figure is the modules' figures weighted by ‖ΔW_a‖‖ΔW_b‖ (the modules that change most count most);
its cosine is the cosine of the block's updates taken as one vector.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import torch

from .adapter import Adapter, LoraModule
from .errors import ConfigError

METRICS = ("cosine", "input", "output")


@dataclass
class _Factors:
    scale: float
    up: torch.Tensor    # [out, r] fp64
    down: torch.Tensor  # [r, in] fp64

    @property
    def gram_up(self) -> torch.Tensor:
        return self.up.T @ self.up

    @property
    def gram_down(self) -> torch.Tensor:
        return self.down @ self.down.T


def factors(module) -> _Factors:
    """Low-rank factors (fp64, 2-D) of a module's ΔW: a LoRA pair as it is, any other type densely (up = ΔW)."""
    if isinstance(module, LoraModule):
        return _Factors(module.scale, module.up.double().flatten(1), module.down.double().flatten(1))
    delta = module.base_delta(torch.float64).flatten(1)
    return _Factors(1.0, delta, torch.eye(delta.shape[1], dtype=torch.float64))


@dataclass
class Stats:
    """One module pair (or a block's sums): the raw sums the figures are made of."""

    dot: float = 0.0           # ⟨ΔW_a, ΔW_b⟩
    sq_a: float = 0.0          # ‖ΔW_a‖²
    sq_b: float = 0.0
    weighted: dict = field(default_factory=lambda: {"input": 0.0, "output": 0.0})  # Σ w·overlap
    weight: float = 0.0        # Σ w, w = ‖ΔW_a‖‖ΔW_b‖
    modules: int = 0

    def add(self, other: "Stats") -> None:
        self.dot += other.dot
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b
        for k in self.weighted:
            self.weighted[k] += other.weighted[k]
        self.weight += other.weight
        self.modules += other.modules

    def figures(self) -> dict:
        denom = math.sqrt(self.sq_a * self.sq_b)
        out = {"cosine": self.dot / denom if denom > 0 else 0.0}
        for k, v in self.weighted.items():
            out[k] = v / self.weight if self.weight > 0 else 0.0
        return {**out, "modules": self.modules, "norm_a": math.sqrt(self.sq_a), "norm_b": math.sqrt(self.sq_b)}


def module_stats(a, b) -> Stats:
    """The pair statistics of two modules of the same layer (``LoraModule`` or ``LycoModule``)."""
    fa, fb = factors(a), factors(b)
    if fa.up.shape[0] != fb.up.shape[0] or fa.down.shape[1] != fb.down.shape[1]:
        raise ConfigError(f"the adapters disagree on a layer's shape ({fa.up.shape[0]}x{fa.down.shape[1]} vs "
                          f"{fb.up.shape[0]}x{fb.down.shape[1]}): they are not for the same base")
    s = fa.scale * fb.scale
    m, n = fa.up.T @ fb.up, fa.down @ fb.down.T  # [ra, rb]
    ha, hb, ga, gb = fa.gram_up, fb.gram_up, fa.gram_down, fb.gram_down
    dot = s * float((m * n).sum())
    sq_a = fa.scale ** 2 * float((ha * ga).sum())
    sq_b = fb.scale ** 2 * float((hb * gb).sum())
    inp = s ** 2 * float(torch.trace(ha @ n @ hb @ n.T))      # ‖ΔW_a·ΔW_bᵀ‖²
    outp = s ** 2 * float(torch.trace(ga @ m @ gb @ m.T))     # ‖ΔW_aᵀ·ΔW_b‖²
    self_a = fa.scale ** 2 * math.sqrt(max(float(torch.trace(ga @ ha @ ga @ ha)), 0.0))  # ‖ΔW_aᵀΔW_a‖
    self_b = fb.scale ** 2 * math.sqrt(max(float(torch.trace(gb @ hb @ gb @ hb)), 0.0))
    w = math.sqrt(max(sq_a, 0.0) * max(sq_b, 0.0))
    stats = Stats(dot=dot, sq_a=sq_a, sq_b=sq_b, weight=w, modules=1)
    denom = math.sqrt(self_a * self_b)
    for key, value in (("input", inp), ("output", outp)):
        ratio = min(math.sqrt(max(value, 0.0)) / denom, 1.0) if denom > 0 else 0.0  # min: rounding above 1
        stats.weighted[key] = w * ratio
    return stats


_BLOCK = re.compile(r"^(down_blocks|mid_block|up_blocks|input_blocks|middle_block|output_blocks)")
_NAMES = {"down_blocks": "down", "input_blocks": "down", "mid_block": "mid", "middle_block": "mid",
          "up_blocks": "up", "output_blocks": "up"}


def block_of(component: str, path: str) -> str:
    """The summary row of a module: ``unet down``/``unet mid``/``unet up`` (``unet other`` for the rest), or the
    text encoder's name."""
    if component != "unet":
        return component
    found = _BLOCK.match(path)
    return f"unet {_NAMES[found.group(1)]}" if found else "unet other"


ORDER = ("unet down", "unet mid", "unet up", "unet other", "text_encoder", "text_encoder_2")


def compare(a: Adapter, b: Adapter) -> dict:
    """Figures of one pair: ``blocks`` {row: figures}, ``total``, ``modules`` {component.path: figures}, and the
    modules only one of them has (they cannot overlap: nothing to compare)."""
    blocks: dict[str, Stats] = {}
    total = Stats()
    per_module = {}
    only_a = only_b = 0
    for comp in sorted(set(a.modules) | set(b.modules)):
        ma, mb = a.modules.get(comp, {}), b.modules.get(comp, {})
        only_a += len(set(ma) - set(mb))
        only_b += len(set(mb) - set(ma))
        for path in sorted(set(ma) & set(mb)):
            try:
                stats = module_stats(ma[path], mb[path])
            except ConfigError as e:
                raise ConfigError(f"{comp}.{path}: {e}") from None
            per_module[f"{comp}.{path}"] = stats.figures()
            blocks.setdefault(block_of(comp, path), Stats()).add(stats)
            total.add(stats)
    rows = sorted(blocks, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER))
    return {"blocks": {k: blocks[k].figures() for k in rows}, "total": total.figures(), "modules": per_module,
            "only_a": only_a, "only_b": only_b}


def report(adapters: list[tuple[str, Adapter]]) -> dict:
    """Every pair of ``[(label, Adapter), ...]`` (at least two) compared: ``{"adapters": [...], "pairs": [...]}``."""
    if len(adapters) < 2:
        raise ConfigError("blend-report needs at least two adapters")
    pairs = []
    for (la, a), (lb, b) in itertools.combinations(adapters, 2):
        if a.family and b.family and a.family != b.family:
            raise ConfigError(f"{la} is for {a.family} and {lb} for {b.family}: compare adapters of one model family")
        pairs.append({"a": la, "b": lb, **compare(a, b)})
    return {"adapters": [label for label, _ in adapters], "pairs": pairs}


def format_table(result: dict) -> str:
    """The printed report: one table per pair, a row per block and the total."""
    lines = []
    for pair in result["pairs"]:
        lines.append(f"{pair['a']}  vs  {pair['b']}")
        lines.append(f"  {'block':<16} {'modules':>7} {'cosine':>8} {'input':>7} {'output':>7} {'|dW_a|':>9} "
                     f"{'|dW_b|':>9}")
        for name, f in [*pair["blocks"].items(), ("total", pair["total"])]:
            lines.append(f"  {name:<16} {f['modules']:>7} {f['cosine']:>+8.3f} {f['input']:>7.3f} "
                         f"{f['output']:>7.3f} {f['norm_a']:>9.3g} {f['norm_b']:>9.3g}")
        if pair["only_a"] or pair["only_b"]:
            lines.append(f"  modules in one adapter only (no overlap): {pair['only_a']} / {pair['only_b']}")
        lines.append("")
    lines.append("cosine: same direction (+1) .. unrelated (0) .. opposite (-1); input/output: 0 = the updates read/"
                 "write orthogonal directions, 1 = the same ones (weighted by |dW_a||dW_b|)")
    return "\n".join(lines)


def toy_style(adapter: Adapter, label: str) -> str:
    """The toy-world style an adapter was trained on (``--classify``), from its trigger word."""
    from .formats.summary import trigger_phrase
    from .toy import world as toyworld

    words = {w.strip() for w in (trigger_phrase(adapter.metadata) or "").split(",")}
    found = [style for style, trigger in toyworld.TRIGGERS.items() if trigger in words]
    if len(found) != 1:
        known = ", ".join(f"{s} ({t})" for s, t in toyworld.TRIGGERS.items())
        raise ConfigError(f"--classify: {label} is not an adapter of one toy style (its trigger words: "
                          f"{', '.join(sorted(words - {''})) or 'none'}; the classifier knows {known}). Train it "
                          "with the style's trigger word, or leave out --classify")
    return found[0]


def sweep(base, adapters: list[tuple[str, Adapter]], *, weights=(0.0, 0.5, 1.0), prompt: str | None = None,
          classify: bool = False, n: int = 8, steps: int = 20, cfg: float = 5.0, seed: int = 0):
    """Render two adapters at every pair of ``weights`` (rows: the first's weight, columns: the second's) with
    both trigger words in the prompt; returns (grid image, cells). ``classify`` (the ``tiny`` base only): ``n``
    held-out toy scenes per cell, read by the toy classifier, and each cell's detection rates (``both``, each
    style, ``content``); otherwise one picture of ``prompt`` per cell. The grid shows each cell's first picture."""
    from .blend import Blender
    from .formats.summary import trigger_phrase
    from .grid import image_grid

    if len(adapters) != 2:
        raise ConfigError(f"the weight sweep takes two adapters, got {len(adapters)}: leave out --base for a "
                          "report of more")
    weights = [float(w) for w in weights]
    if not weights or any(not math.isfinite(w) for w in weights):
        raise ConfigError(f"--weights must be finite numbers, got {weights}")
    triggers = [trigger_phrase(a.metadata) or "" for _, a in adapters]
    if classify:
        from .models import TINY
        from .toy import classifiers
        from .toy import world as toyworld

        if TINY.get(base.spec) != "toy":
            raise ConfigError(f"--classify reads pictures with the toy-world classifier: it needs the toy base "
                              f"(--base tiny), not {base.spec}")
        styles = [toy_style(a, label) for label, a in adapters]
        clf = classifiers.load_classifier()
        scenes = toyworld.held_out_scenes(n, seed=seed)
        prompts = [toyworld.captioned(s, *(t for t in triggers if t)) for s in scenes]
    else:
        prompts = [", ".join([*(t for t in triggers if t), prompt or "a house by a lake"])]
    blender = Blender(base)
    names = [blender.load(a, name=f"sweep{i}") for i, (_, a) in enumerate(adapters)]
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)
    rows, cells = [], []
    try:
        for wa in weights:
            row = []
            for wb in weights:
                blender.set({names[0]: wa, names[1]: wb})
                images = []
                for i in range(0, len(prompts), 10):
                    part = prompts[i:i + 10]
                    gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(part))]
                    with torch.no_grad():
                        images += pipe(part, num_inference_steps=steps, guidance_scale=cfg, generator=gens).images
                row.append(images[0])
                cell = {"weights": [wa, wb]}
                if classify:
                    labs = classifiers.classify(clf, images)
                    k = len(labs)
                    cell.update({"both": sum(set(styles) <= lab["styles"] for lab in labs) / k,
                                 styles[0]: sum(styles[0] in lab["styles"] for lab in labs) / k,
                                 styles[1]: sum(styles[1] in lab["styles"] for lab in labs) / k,
                                 "content": sum(lab["shape"] == s.shape and lab["colour"] == s.colour
                                                for lab, s in zip(labs, scenes)) / k})
                cells.append(cell)
            rows.append(row)
    finally:
        blender.reset()
        for name in names:
            blender.unload(name)
    (la, _), (lb, _) = adapters
    grid = image_grid(rows, row_labels=[f"{_short(la)} {w:g}" for w in weights],
                      col_labels=[f"{_short(lb)} {w:g}" for w in weights])
    return grid, cells


def _short(label: str) -> str:
    from pathlib import Path

    return Path(label).stem


def format_cells(cells: list[dict], labels: list[str]) -> str:
    """The sweep's detection rates, one row per cell."""
    if not cells or "both" not in cells[0]:
        return ""
    keys = [k for k in cells[0] if k not in ("weights", "both", "content")]
    a, b = (_short(x) for x in labels)
    lines = [f"{a + ' w':>10} {b + ' w':>10} {'both':>6} " + " ".join(f"{k:>9}" for k in keys) + f" {'content':>8}"]
    for c in cells:
        lines.append(f"{c['weights'][0]:>10g} {c['weights'][1]:>10g} {100 * c['both']:>5.0f}% "
                     + " ".join(f"{100 * c[k]:>8.0f}%" for k in keys) + f" {100 * c['content']:>7.0f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ block weights from the report
def energy(module) -> float:
    """‖ΔW‖² of one module, from its factors: s²·Σ (UᵀU)∘(D·Dᵀ)."""
    f = factors(module)
    return f.scale ** 2 * float((f.gram_up * f.gram_down).sum())


def block_plan(adapters: list[tuple[str, Adapter]], weights: dict[str, float], unet_config, *,
               threshold: float = 0.3, metric: str = "input") -> dict:
    """``suggest_blocks`` with its reasons: ``{"blocks": {label: Blocks}, "length": n, "rows": [...]}``, a row per
    A1111 block some adapter has modules in: ``block``, ``shares`` {label: energy share} of the adapters with modules
    there, ``overlap`` (None where no two of them share a module), ``contested``, ``owner`` (None if not
    contested). The rule is in ``suggest_blocks``."""
    from .blocks import FAMILY_LENGTHS, ORDERS, SD_LENGTHS, Blocks
    from .blocks import block_of as a1111_block

    if len(adapters) < 2:
        raise ConfigError(f"block weights from the report need at least two adapters, got {len(adapters)}")
    if metric not in METRICS:
        raise ConfigError(f"unknown overlap metric {metric!r}: choose one of {', '.join(METRICS)}")
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"block threshold {threshold!r}: give a number from 0 to 1 (the overlap from which a "
                          "block counts as contested; 0.3 by default)")
    labels = [label for label, _ in adapters]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"block weights from the report: adapter names repeat in {labels}; give each its own")
    for label in labels:
        if label not in weights:
            raise ConfigError(f"block weights from the report: no weight for {label!r} (weights given for "
                              f"{', '.join(map(repr, weights)) or 'none'})")
        w = weights[label]
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ConfigError(f"block weights from the report: the weight of {label!r} is {w!r}; give a number "
                              "above 0 (an adapter at 0 or below takes no part in the blend's budget)")
    families = {a.family for _, a in adapters if a.family}
    if len(families) > 1:
        raise ConfigError(f"block weights from the report: the adapters are for {', '.join(sorted(families))}; "
                          "blend adapters of one model family")
    family = families.pop() if families else None

    # per adapter: {block: Σ‖ΔW‖²} and its total; modules in no block (time embedding, …) keep 1 and are left out
    where: dict[tuple[str, str], str | None] = {}
    block_energy: dict[str, dict[str, float]] = {}
    total: dict[str, float] = {}
    for label, a in adapters:
        sums: dict[str, float] = {}
        whole = 0.0
        for comp, mods in a.modules.items():
            for path, m in mods.items():
                if (comp, path) not in where:
                    where[(comp, path)] = a1111_block(comp, path, unet_config)
                e = energy(m)
                whole += e
                if where[(comp, path)] is not None:
                    sums[where[(comp, path)]] = sums.get(where[(comp, path)], 0.0) + e
        block_energy[label], total[label] = sums, whole
    used = {b for sums in block_energy.values() for b in sums}
    # the family's own vector (17 for SD1/SD2, 12 for SDXL) when it lists every block the adapters use, else the
    # longer one (26 / 20), else 26: a block the vector does not list would get 0 (as in A1111), not "no effect"
    lengths = [*FAMILY_LENGTHS.get(family or "", SD_LENGTHS), 26]
    length = next(n for n in lengths if used <= set(ORDERS[n]))

    # per block and pair: the overlap figure, weighted over the shared modules as compare() does
    pair_stats: dict[str, dict[tuple[str, str], Stats]] = {}
    for (la, a), (lb, b) in itertools.combinations(adapters, 2):
        for comp in sorted(set(a.modules) & set(b.modules)):
            ma, mb = a.modules[comp], b.modules[comp]
            for path in sorted(set(ma) & set(mb)):
                block = where[(comp, path)]
                if block is None:
                    continue
                try:
                    stats = module_stats(ma[path], mb[path])
                except ConfigError as e:
                    raise ConfigError(f"{comp}.{path}: {e}") from None
                pair_stats.setdefault(block, {}).setdefault((la, lb), Stats()).add(stats)

    mult = {label: {} for label in labels}
    rows = []
    for block in [b for b in ORDERS[26] if b in used]:
        present = [label for label in labels if block in block_energy[label]]
        shares = {label: block_energy[label][block] / total[label] if total[label] > 0 else 0.0
                  for label in present}
        figures = [s.figures()[metric] for s in pair_stats.get(block, {}).values()]
        overlap = max((abs(f) for f in figures), default=None)  # cosine: opposite pushes interfere as well
        contested = overlap is not None and overlap >= threshold
        owner = None
        if contested:
            owner = max(present, key=lambda label: shares[label])  # ties: the first listed
            budget = sum(weights[label] for label in present)
            for label in present:
                mult[label][block] = budget / weights[owner] if label == owner else 0.0
        rows.append({"block": block, "shares": shares, "overlap": overlap, "contested": contested, "owner": owner})
    blocks = {label: Blocks(tuple(float(mult[label].get(b, 1.0)) for b in ORDERS[length])) for label in labels}
    return {"blocks": blocks, "length": length, "rows": rows, "threshold": threshold, "metric": metric}


def suggest_blocks(adapters: list[tuple[str, Adapter]], weights: dict[str, float], unet_config,
                   threshold: float = 0.3, metric: str = "input") -> dict:
    """Block-weight vectors (``{label: blocks.Blocks}``) for blending ``adapters`` at ``weights`` ({label: w > 0}),
    chosen from where they overlap. ``unet_config`` numbers the UNet's blocks (``blocks.block_of``).

    The rule, per A1111 block (``BASE`` = the text encoders, ``IN``/``M00``/``OUT`` the UNet's):

    - each adapter's energy share there: Σ‖ΔW‖² of its modules in the block / Σ‖ΔW‖² of all its modules;
    - the block's overlap: ``metric`` (``input``, ``output`` or ``|cosine|``) of each pair over the modules both
      have, weighted by ‖ΔW_a‖‖ΔW_b‖ as ``compare`` does; with more than two adapters the largest pair's;
    - contested (overlap ≥ ``threshold``): the adapter with the largest share (the first listed on a tie) takes
      the block's whole budget: multiplier Σ_j w_j / w_owner over the adapters with modules in the block, so its
      effective weight there is their weights' sum; the others get 0 there;
    - not contested (no shared module, or overlap below the threshold): every adapter 1, as is every block an
      adapter has no modules in (no effect) and every module outside the blocks (time embedding, …).

    The vectors are the family's own length (17 for SD1/SD2, 12 for SDXL) when that lists every block the adapters
    use, else the longer one (26, SDXL 20), else 26; ``Blocks.text()`` is the ``lbw=`` string."""
    return block_plan(adapters, weights, unet_config, threshold=threshold, metric=metric)["blocks"]
