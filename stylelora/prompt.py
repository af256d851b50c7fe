"""Adapter references: ``FILE:W[:W_TE]`` command-line specs, A1111 ``<lora:name:w>`` prompt tags, name lookup.

Two orders exist and both are kept on purpose:
- ``--lora FILE:W_UNET:W_TE`` and ``Blender.set({"x": (w_unet, w_te)})`` put the UNet weight first (our API);
- ``<lora:name:W_TE:W_UNET>`` follows AUTOMATIC1111 (extensions-builtin/Lora/extra_networks_lora.py): the first
  number is the text-encoder multiplier and the UNet one defaults to it; ``te=`` / ``unet=`` name them explicitly.

Block weights (stylelora/blocks.py) are ``FILE:W@BLOCKS`` on the command line and, as A1111's LoRA Block Weight
extension reads them, ``<lora:name:w:lbw=BLOCKS>`` in a prompt (or its older ``<lora:name:w:BLOCKS>``), where
BLOCKS is a preset name or 12/17/20/26 comma-separated numbers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .blocks import Blocks, is_number, parse_blocks, split_spec
from .errors import AdapterError, ConfigError

log = logging.getLogger(__name__)

# A1111's extra-network pattern is <(\w+):([^>]+)>; we only consume the LoRA kinds and leave other tags as text.
_TAG = re.compile(r"<(lora|lyco):([^>]+)>", re.IGNORECASE)
ADAPTER_SUFFIXES = (".safetensors",)
# Folders a training run writes beside its adapter: resumable checkpoints (whose lora.safetensors holds raw
# training parameters, not a loadable adapter) and sample images. Adapter listings never look inside them.
RUN_FOLDER_SUFFIXES = ("-checkpoints", "-samples")


def is_run_folder(name: str) -> bool:
    """Whether a folder named ``name`` is a training run's checkpoint or sample folder (skipped by listings)."""
    return name.endswith(RUN_FOLDER_SUFFIXES)


@dataclass(frozen=True)
class LoraRef:
    """One adapter to blend: a file path or a name, its UNet / text-encoder weights and optional block weights."""

    source: str
    unet: float = 1.0
    te: float = 1.0
    blocks: Blocks | None = None

    @property
    def weights(self) -> tuple[float, float]:
        return (self.unet, self.te)

    def tag(self, name: str | None = None) -> str:
        """A1111 prompt tag for this reference (text-encoder weight first, as A1111 reads it)."""
        name = name or Path(self.source).stem
        lbw = f":lbw={self.blocks.text()}" if self.blocks is not None else ""
        if self.unet == self.te:
            return f"<lora:{name}:{_num(self.te)}{lbw}>"
        return f"<lora:{name}:{_num(self.te)}:{_num(self.unet)}{lbw}>"


def _num(x: float) -> str:
    return f"{x:g}"


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{what}: weight must be finite, got {text!r}")
    return value


def parse_spec(spec: str, default: float = 1.0) -> LoraRef:
    """``FILE``, ``FILE:W`` (UNet and TE) or ``FILE:W_UNET:W_TE``, each optionally followed by ``@BLOCKS`` (a block
    weight preset or comma list); the path itself may contain ':' (e.g. ``C:\\``)."""
    if Path(spec).exists():
        return LoraRef(spec, default, default)
    head, blocks = split_spec(spec)
    if blocks is not None:
        ref = parse_spec(head, default)
        return LoraRef(ref.source, ref.unet, ref.te, blocks)
    parts = spec.split(":")
    nums: list[str] = []
    while len(parts) > 1 and len(nums) < 2 and is_number(parts[-1]):
        nums.insert(0, parts.pop())
    source = ":".join(parts)
    if not source:
        raise ConfigError(f"--lora {spec!r}: missing the adapter file before ':'")
    if not nums and len(parts) > 1 and not parts[-1].startswith(("/", "\\")):
        # "file:abc" is a weight typo, not a file named "file:abc" (a Windows "C:\\..." path goes on with a slash)
        raise ConfigError(f"--lora {spec!r}: weight {parts[-1]!r} is not a number; write FILE:W or FILE:W_UNET:W_TE")
    if not nums:
        return LoraRef(source, default, default)
    unet = _float(nums[0], f"--lora {spec!r}")
    te = _float(nums[1], f"--lora {spec!r}") if len(nums) > 1 else unet
    return LoraRef(source, unet, te)


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """Strip ``<lora:name:...>`` tags from ``prompt``; returns the clean prompt and a ``LoraRef`` (by name) per tag."""
    refs: list[LoraRef] = []

    def found(m: re.Match) -> str:
        items = m.group(2).split(":")
        positional = [i for i in items if "=" not in i]
        named = dict(i.split("=", 1) for i in items if "=" in i)
        if not positional or not positional[0].strip():
            raise ConfigError(f"prompt tag {m.group(0)!r}: a LoRA tag must start with the adapter name")
        name = positional[0].strip()
        where = f"prompt tag {m.group(0)!r}"
        te = _float(positional[1], where) if len(positional) > 1 else 1.0
        te = _float(named["te"], where) if "te" in named else te
        blocks = None
        if len(positional) > 2 and not is_number(positional[2]) and "lbw" not in named:
            # the LoRA Block Weight extension's older form <lora:name:w:BLOCKS> (its syntaxdealer reads item 2)
            blocks = parse_blocks(positional.pop(2), f"{where}: block weights")
        if "lbw" in named:
            blocks = parse_blocks(named["lbw"], f"{where}: lbw")
        unet = _float(positional[2], where) if len(positional) > 2 else te
        unet = _float(named["unet"], where) if "unet" in named else unet
        ignored = sorted(set(named) - {"te", "unet", "lbw"}) + (["dyn (4th number)"] if len(positional) > 3 else [])
        if ignored:
            log.warning("%s: ignoring %s (not supported by stylelora)", where, ", ".join(ignored))
        refs.append(LoraRef(name, unet, te, blocks))
        return ""

    clean = _TAG.sub(found, prompt)
    # Removing a tag leaves doubled spaces and dangling commas; CLIP's tokenizer collapses whitespace anyway, so
    # tidying changes nothing the model sees, only what the user reads back.
    clean = re.sub(r"\s+", " ", clean)
    clean = re.sub(r"\s+,", ",", clean)
    clean = re.sub(r",(\s*,)+", ",", clean)
    return clean.strip(" ,"), refs


def available_adapters(folders: list[str | Path]) -> dict[str, Path]:
    """Adapter files in ``folders`` (searched recursively), by name: file stem, and ``sub/dir/stem`` for nested ones."""
    from .formats.embeddings import is_embedding_file

    found: dict[str, Path] = {}
    for folder in folders:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--adapters {root}: not a folder")
        for path in sorted(root.rglob("*")):
            if any(is_run_folder(part) for part in path.relative_to(root).parts[:-1]):
                continue  # a run's checkpoints/samples, not adapters
            if path.suffix.lower() in ADAPTER_SUFFIXES and path.is_file() and not is_embedding_file(path):
                rel = path.relative_to(root).with_suffix("").as_posix()
                found.setdefault(rel, path)
                found.setdefault(path.stem, path)
    return found


def resolve(ref: LoraRef, folders: list[str | Path]) -> Path:
    """The file a reference points to: an existing path, or a name looked up in ``folders``."""
    path = Path(ref.source).expanduser()
    if path.is_file():
        return path
    if not folders:
        raise AdapterError(f"adapter {ref.source!r}: no such file (pass a path, or --adapters FOLDER to look names up)")
    names = available_adapters(folders)
    hit = names.get(ref.source) or names.get(Path(ref.source).with_suffix("").as_posix() if path.suffix else "")
    if hit is None:
        lowered = {k.lower(): v for k, v in names.items()}
        hit = lowered.get(ref.source.lower())
    if hit is None:
        where = ", ".join(str(f) for f in folders)
        listing = ", ".join(sorted({p.stem for p in names.values()})[:60]) or "(none)"
        raise AdapterError(f"unknown adapter {ref.source!r}: not a file and not found in {where}. Available: {listing}")
    return hit
