"""``stylelora inspect FILE [--json]``: what an adapter file holds and how it was trained."""

from __future__ import annotations

import json



def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="show an adapter's format, family, ranks, embeddings, hashes and training record",
        description="Show what a LoRA file holds: layout, model family, rank/alpha per part, module count, trigger, "
                    "learnt token embeddings, hashes and the training record from its metadata. Reads kohya, PEFT "
                    "and diffusers files.",
    )
    p.add_argument("file", help="adapter .safetensors file (or a diffusers LoRA output folder)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with sorted keys (schema: docs/inspect-json.md)")
    p.add_argument("--no-hash", action="store_true", help="skip recomputing the model hashes (faster on big files)")
    p.set_defaults(func=run)


def _g(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _components(info: dict) -> list[str]:
    rows = []
    for name, c in sorted(info["components"].items()):
        # per-module ranks (a resized file): their spread, not a list of every value
        ranks = f"{c['ranks'][0]}/{c['rank_median']:g}/{c['ranks'][-1]} (min/median/max)" \
            if len(c["ranks"]) > 1 else str(c["rank"])
        alphas = ", ".join(map(_g, c["alphas"])) if len(c["alphas"]) > 1 else _g(c["alpha"])
        conv = f", {c['conv_modules']} conv" if c["conv_modules"] else ""
        uniform = c["scale"] is not None and len(c["alphas"]) == 1 and len(c["ranks"]) == 1
        scale = f" (scale {c['scale']:g})" if uniform else ""
        types = c.get("types") or {}
        kinds = "" if set(types) <= {"lora"} else " (" + ", ".join(f"{n} {k}" for k, n in sorted(types.items())) + ")"
        shape = f"rank {ranks}, alpha {alphas}{scale}; " if c["ranks"] else ""
        rows.append(f"  {name:<15} {shape}{c['modules']} modules{kinds}{conv}; {'/'.join(c['dtypes'])}")
    return rows


def _readers(info: dict) -> list[str]:
    """Which tools read the file (formats.summary.READERS; the README's table gives the sources)."""
    r = info.get("readers")
    if not r:
        return []
    return ["readers         " + "; ".join(f"{tool} {verdict}" for tool, verdict in r.items())]


def _training(t: dict | None) -> list[str]:
    if not t:
        return ["training        (no training metadata)"]
    parts = [f"{t[k]} {label}" for k, label in (("steps", "steps"), ("epoch", "epochs"),
                                                  ("num_train_images", "images (with repeats)")) if t[k] is not None]
    if t["resolution"]:
        parts.append(t["resolution"])
    if t["learning_rate"] is not None:
        parts.append(f"lr {t['learning_rate']:g}")
    if t["seed"] is not None:
        parts.append(f"seed {t['seed']}")
    rows = [f"training        {', '.join(parts) or '(no training record)'}"]
    if t["base_model"]:
        rows.append(f"base model      {t['base_model']}")
    if t["finished_at"]:
        took = f" ({t['duration_s']:.0f} s)" if t["duration_s"] is not None else ""
        rows.append(f"finished        {t['finished_at']}{took}")
    if t["top_tags"]:
        rows.append("top tags        " + ", ".join(f"{tag} ({n})" for tag, n in t["top_tags"][:10]))
    if t["stylelora_version"]:
        rows.append(f"made by         stylelora {t['stylelora_version']}")
    return rows


def _embeddings(info: dict) -> list[str]:
    rows = []
    for e in info["embeddings"]:
        parts = "; ".join(f"{comp} width {c['width']}, mean norm {c['mean_norm']:.4g}"
                          for comp, c in e["components"].items())
        rows.append(f"embedding       {e['name']}: {e['num_tokens']} token{'s' if e['num_tokens'] != 1 else ''}; "
                    f"{parts}")
    if info["embeddings_error"]:
        rows.append(f"BAD EMBEDDING   {info['embeddings_error']}")
    return rows


def _merged(rows: list | None) -> list[str]:
    if not rows:
        return []

    def weight(w) -> str:
        if isinstance(w, dict):
            return f"unet {_g(w.get('unet'))}, text encoder {_g(w.get('text_encoder'))}"
        return _g(w)

    return [f"merged from     {r.get('name', '?')} weight {weight(r.get('weight'))}"
            + (f", hash {str(r['sshs_model_hash'])[:12]}" if r.get("sshs_model_hash") else "") for r in rows]


def format_text(info: dict) -> str:
    fam = info["family"] or "unknown"
    if info["family_source"]:
        fam += f" (from {info['family_source']})"
    naming = f", {info['unet_naming']} UNet names" if info["unet_naming"] else ""
    counts = ", ".join(f"{n} {c['modules']}" for n, c in sorted(info["components"].items()))
    h = info["hashes"]
    stored = h["sshs_model_hash"] or "(not stored)"
    check = {True: "matches the tensors", False: "DOES NOT match the tensors", None: ""}[h["matches"]]
    lines = [
        info["file"],
        f"format          {info['format']}{naming} ({info['container']}, {info['num_tensors']} tensors, "
        f"{info['size_bytes']} bytes)",
        f"family          {fam}",
        f"modules         {info['num_modules']} ({counts or 'none'})",
        *_components(info),
        *_readers(info),
        f"trigger         {info['trigger'] or '-'}",
        *_merged(info.get("merged_from")),
        *_embeddings(info),
        f"model hash      {stored} {check}".rstrip(),
        f"legacy hash     {h['sshs_legacy_hash'] or h['legacy_hash'] or '-'}",
        *_training(info["training"]),
    ]
    if info["unsupported_keys"]:
        lines.append(f"NOT SUPPORTED   {len(info['unsupported_keys'])} keys, e.g. {info['unsupported_keys'][0]} "
                     "(OFT/BOFT, GLoRA, (IA)^3 or LoRA-bias keys: stylelora cannot load this file)")
    if info["unrecognized_keys"]:
        lines.append(f"unrecognized    {len(info['unrecognized_keys'])} keys, e.g. {info['unrecognized_keys'][0]}")
    return "\n".join(lines)


def run(args) -> int:
    from ..formats import describe  # late: torch is imported only once a command runs
    from ..formats.summary import finite

    info = describe(args.file, hashes=not args.no_hash)
    # standard JSON only: metadata numbers that are NaN/inf are shown as null, never as NaN
    print(json.dumps(finite(info), sort_keys=True, indent=2, allow_nan=False) if args.json else format_text(info))
    return 0
