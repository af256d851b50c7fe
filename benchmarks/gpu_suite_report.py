"""The report of benchmarks/gpu_suite.py: markdown tables, the goals of issue 19 with met / not met, a JSON block."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

GB = 1e9 / 2**30
PRECISION = {"no": "fp32"}  # the goals speak of GB (10^9 bytes); torch reports GiB


def _f(v, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, fmt) + suffix


def training_rows(results: dict) -> list[dict]:
    """Every training row of every stage, compiled rows given the MFU of the eager FLOP count of the same step
    (the FLOP counter cannot see through torch.compile; the arithmetic is the same)."""
    rows = [dict(r, stage=s) for s in ("train", "train-compiled", "sdxl", "lowmem")
            for r in results.get(s, {}).get("rows", [])]
    eager = {(r["arch"], r["resolution"], r["batch"], r["mode"]): r for r in rows if r.get("mfu")}
    for r in rows:
        e = eager.get((r["arch"], r["resolution"], r["batch"], r["mode"]))
        if r.get("mfu") is None and "compile" in r["options"] and e:
            r["mfu"] = e["mfu"] * e["step_ms"] / r["step_ms"]  # equal FLOPs: MFU scales with 1 / step time
            r["mfu_from_eager_flops"] = True
    return rows


def goals(results: dict) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, met) for each goal of issue 19 the run measured ('-' where it did not)."""
    out = []

    def add(goal, target, value, ok):
        out.append((goal, target, value if value is not None else "not measured",
                    "-" if ok is None else ("yes" if ok else "**no**")))

    peer = results.get("peer", {})
    ours, theirs = peer.get("ours", {}), peer.get("peer", {})
    ratio = (ours["images_per_s"] / theirs["images_per_s"]
             if ours.get("images_per_s") and theirs.get("images_per_s") else None)
    add(f"images/s vs the peer at batch {peer.get('batch', 4)}", ">= 2.5x",
        ratio and f"{ratio:.2f}x ({ours['images_per_s']:.2f} vs {theirs['images_per_s']:.2f})",
        None if ratio is None else ratio >= 2.5)
    mem = (ours.get("peak_mem_gib"), theirs.get("peak_mem_gib"))
    add("peak memory vs the peer, same batch", "<= peer", None if None in mem else
        f"{mem[0]:.2f} vs {mem[1]:.2f} GiB", None if None in mem else mem[0] <= mem[1])
    rows = training_rows(results)
    b16 = [r for r in rows if r["batch"] == 16 and r["mode"] == "cached" and r.get("mfu")]
    best = max(b16, key=lambda r: r["mfu"], default=None)
    add("MFU at batch 16 (SD1.5 512², cached, best of eager/compiled)", ">= 30 %",
        best and f"{best['mfu'] * 100:.1f} % ({best['options'] or 'eager'})", best and best["mfu"] >= 0.30)
    for arch, limit in (("sd15", 6), ("sdxl", 12)):
        low = next((r for r in results.get("lowmem", {}).get("rows", []) if r["arch"] == arch), None)
        gib = low and low.get("peak_mem_gib")
        add(f"{arch.upper()} LoRA training peak, low-memory settings", f"<= {limit} GB",
            gib and f"{gib / GB:.2f} GB ({low['options']})", gib and gib / GB <= limit)
    s = blend_seconds(results)
    fused = [v for k, v in s.items() if k.startswith("fused blend") and "compiled" not in k]
    cands = [("eager, worst of 1/3/5", max(fused) if fused else None),
             ("compiled, worst of 3/5", max((v for k, v in s.items() if k.startswith("fused") and "compiled" in k),
                                            default=None))]
    cands = [(n, v) for n, v in cands if v is not None]
    b = results.get("blend") or results.get("blend-compiled") or {}
    add(f"generation per {b.get('size', 512)}² image, {b.get('steps', 30)} steps, fused adapters", "<= 0.6 s",
        "; ".join(f"{v:.3f} s ({n})" for n, v in cands) or None, min(v for _, v in cands) <= 0.6 if cands else None)
    change = s.get("change weights (5 adapters, all)")
    add("weight change (5 adapters)", "<= 100 ms", change and f"{change * 1e3:.1f} ms", change and change <= 0.1)
    rec = results.get("blend-compiled", {}).get("recompilations_after_weight_changes")
    add("recompilations after weight changes", "0", None if rec is None else str(rec),
        None if rec is None else rec == 0)
    return out


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; columns holding only figures ('12.5', '3.1 %', '2.50x', '-') are right-aligned."""
    def numeric(i):
        cells = [r[i] for r in rows if r[i]]
        return all(re.fullmatch(r"-|[-\d.]+( %\*?|x)?", c) for c in cells) and any(c != "-" for c in cells)

    align = ["---:" if numeric(i) else "---" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def tables(results: dict, dry: bool) -> list[str]:
    lines = ["## Goals (issue 19)", ""]
    if dry:
        lines += ["Dry run: toy sizes on the CPU. These figures only show that every stage runs; they measure nothing.",
                  ""]
    lines += _table(["goal", "target", "measured", "met"], [list(g) for g in goals(results)])
    rows = training_rows(results)
    if rows:
        lines += ["", "## Training step (benchmarks/train_throughput.py)", ""]
        lines += _table(["model", "px", "batch", "data", "options", "images/s", "step ms", "peak GiB", "TFLOP/step",
                         "MFU"], [[r["arch"], str(r["resolution"]), str(r["batch"]), r["mode"], r["options"] or "-",
                                   f"{r['images_per_s']:.2f}", f"{r['step_ms']:.1f}", _f(r["peak_mem_gib"], ".2f"),
                                   _f(r["tflop_per_step"], ".3f"),
                                   _f(r.get("mfu") and r["mfu"] * 100, ".1f", " %" +
                                      ("*" if r.get("mfu_from_eager_flops") else ""))] for r in rows])
        if any(r.get("mfu_from_eager_flops") for r in rows):
            lines += ["", "\\* compiled: MFU from the eager step's FLOP count (same arithmetic, counter blind to "
                      "torch.compile)."]
    peer = results.get("peer", {})
    if "ours" in peer:
        lines += ["", f"## Side by side with the peer ({peer['timed_steps']} timed steps of {peer['steps']}, batch "
                  f"{peer['batch']}, rank {peer['rank']}, {PRECISION.get(peer['precision'], peer['precision'])}, "
                  f"{peer['resolution']} px, "
                  f"{peer['base']})", ""]
        side = []
        for name, label in (("ours", "stylelora train"), ("peer", "diffusers train_dreambooth_lora.py")):
            r = peer.get(name, {})
            note = r.get("skipped") or r.get("error") or ""
            side.append([label, _f(r.get("images_per_s"), ".2f"), _f(r.get("step_ms"), ".1f"),
                         _f(r.get("peak_mem_gib"), ".2f"), _f(r.get("wall_s"), ".0f"), note.replace("|", "/")[:160]])
        lines += _table(["trainer", "images/s", "step ms", "peak GiB", "wall s", "note"], side)
    s = blend_seconds(results)
    if s:
        b = results.get("blend") or results.get("blend-compiled")
        lines += ["", f"## Generation (benchmarks/blend_latency.py: {b['base']}, {b['dtype']}, {b['size']}², "
                  f"{b['steps']} steps, rank {b['rank']})", ""]
        base = s.get("base") or s.get("base (compiled)")
        lines += _table(["per image or operation", "ms", "vs base"],
                        [[k, f"{v * 1e3:.1f}", f"{v / base:.2f}x" if _per_image(k) else ""] for k, v in s.items()])
        rec = results.get("blend-compiled", {}).get("recompilations_after_weight_changes")
        if rec is not None:
            lines += ["", f"Recompilations after 4 weight changes (compiled UNet): {rec}"]
    t = results.get("cuda-tests", {})
    if "summary" in t:
        lines += ["", f"## CUDA tests (`pytest -m gpu`): {t['summary']}"] + [f"- failed: {f}" for f in t["failed"]]
    lines += ["", "## Stages", ""]
    lines += _table(["stage", "status", "seconds", "note"],
                    [[n, r["status"], f"{r['stage_s']:.0f}", (r.get("note") or "; ".join(r.get("notes", [])))
                      .replace("|", "/").replace("\n", " ")[:200]] for n, r in results.items()])
    return lines


def blend_seconds(results: dict) -> dict:
    """The eager stage's figures (more repeats), then what only the compiled stage measured."""
    s = dict(results.get("blend", {}).get("seconds", {}))
    for k, v in results.get("blend-compiled", {}).get("seconds", {}).items():
        s.setdefault(k, v)
    return s


def _per_image(key: str) -> bool:
    return key.startswith(("base", "fused", "PEFT"))


def write_report(results: dict, folder: Path, *, dry: bool, only, elapsed: float, budget: float):
    """Write ``<gpu>-<date>.md`` into ``folder`` (replacing the same day's file) and return (path, printed text)."""
    facts = results.get("facts", {})
    gpu = "cpu-dry-run" if dry else re.sub(r"[^a-z0-9]+", "-", str(facts.get("gpu", "gpu")).lower()).strip("-")
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    path = Path(folder) / f"{gpu}-{day}{'-' + '-'.join(only) if only else ''}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    smi = facts.get("nvidia_smi", {})
    head = [f"# stylelora on {facts.get('gpu')}, {facts.get('date')}", "",
            f"`make bench-gpu` (benchmarks/gpu_suite.py{' --dry-run' if dry else ''}), {elapsed:.0f} s of a "
            f"{budget:.0f} s budget, commit {facts.get('commit')}. "
            f"torch {facts.get('torch')} (CUDA {facts.get('cuda')}), diffusers {facts.get('diffusers')}, "
            f"transformers {facts.get('transformers')}, peft {facts.get('peft')}, "
            f"accelerate {facts.get('accelerate')}, "
            f"bitsandbytes {facts.get('bitsandbytes') or 'not installed'}."]
    if smi:
        head.append(f"nvidia-smi: {', '.join(f'{k} {v}' for k, v in smi.items())}; {facts.get('gpu_count')} GPU(s).")
    if facts.get("peer"):
        p = facts["peer"]
        head.append(f"Peer: diffusers {p['diffusers_commit'][:10]} examples/dreambooth/train_dreambooth_lora.py, "
                    f"sha256 {p['sha256'][:12]}{'' if p['pinned'] else ' (NOT the pinned file)'}.")
    body = tables(results, dry)
    text = "\n".join(head + [""] + body)
    blob = json.dumps(results, indent=1, default=str)
    path.write_text(text + "\n\n## JSON\n\n```json\n" + blob + "\n```\n")
    return path, text
