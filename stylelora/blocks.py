"""Per-block weights in the syntax of A1111's "LoRA Block Weight" extension (hako-mikan/sd-webui-lora-block-weight).

A vector gives one multiplier per block of the model: ``BASE`` (every text encoder), ``IN00``…``IN11`` (the ldm
UNet's ``input_blocks.N``), ``M00`` (``middle_block``), ``OUT00``…``OUT11`` (``output_blocks.N``). Vectors have 12
(SDXL LoRA), 17 (SD1/SD2 LoRA), 20 (SDXL LyCORIS) or 26 (every block) values, or name a preset (``INS``, ``OUTD``…).
A block a shorter vector does not list gets 0; a module in no block (time embedding, SDXL's ``label_emb``,
``conv_out``) keeps multiplier 1. The facts and their source lines are in docs/block-weights.md.

Nothing here imports torch: ``--lora FILE:W@BLOCKS`` is checked before the slow imports.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from .errors import AdapterError, ConfigError

log = logging.getLogger(__name__)

# Block orders of each vector length (the extension's BLOCKID26/17/12/20).
BLOCKS_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             *(f"OUT{i:02d}" for i in range(3, 12)))
BLOCKS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
BLOCKS_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
ORDERS = {12: BLOCKS_12, 17: BLOCKS_17, 20: BLOCKS_20, 26: BLOCKS_26}
# Which lengths are made for which base (the extension's README tables); another length still works, by block name.
FAMILY_LENGTHS = {"sdxl": (12, 20)}
SD_LENGTHS = (17, 26)

# The extension's built-in presets (DEF_WEIGHT_PRESET, also written as its default lbwpresets.txt), all 17 values.
PRESETS_TEXT = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
"""


def read_presets(text: str, where: str = "presets") -> dict[str, tuple[float, ...]]:
    """``NAME:v,v,…`` lines (the lbwpresets.txt format) -> {name: values}. As in the extension, a line without ':',
    without a known number of values, or with '#' is a comment."""
    out = {}
    for line in text.splitlines():
        name, colon, values = line.partition(":")
        if not colon or "#" in line or values.count(",") + 1 not in ORDERS:
            continue
        out[name.strip()] = parse_values(values, f"{where}: {name.strip()}")
    return out


@dataclass(frozen=True)
class Blocks:
    """One block-weight vector: its values in the order of ``ORDERS[len(values)]``, and the preset it came from."""

    values: tuple[float, ...]
    preset: str | None = None

    def __post_init__(self):
        if len(self.values) not in ORDERS:
            raise ConfigError(f"block weights: {len(self.values)} values; give {_lengths()}")
        if not all(math.isfinite(v) for v in self.values):
            raise ConfigError(f"block weights {list(self.values)}: every value must be a finite number")

    @property
    def ids(self) -> tuple[str, ...]:
        return ORDERS[len(self.values)]

    def multiplier(self, block: str | None) -> float:
        """The multiplier of ``block`` (a ``BLOCKS_26`` id): its value, 0 where the vector does not list it (the
        extension's ``to26`` fills those with 0), 1 for a module in no block (``block`` None)."""
        if block is None:
            return 1.0
        ids = self.ids
        return self.values[ids.index(block)] if block in ids else 0.0

    def text(self) -> str:
        """The ``lbw=`` form: the preset name if it came from one, else the values (read back exactly)."""
        return self.preset or ",".join(_num(v) for v in self.values)

    def __str__(self) -> str:
        return self.text()


@dataclass(frozen=True)
class BlockWeight:
    """An adapter's weight with per-block multipliers, for ``Blender.set``: ``BlockWeight(0.8, "INS")`` or
    ``BlockWeight((0.8, 0.5), "1,0,0,…")`` (a (unet, text encoder) pair, as plain weights)."""

    weight: float | tuple[float, float]
    blocks: Blocks | str | tuple | list

    def __post_init__(self):
        object.__setattr__(self, "blocks", as_blocks(self.blocks))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _lengths() -> str:
    return "12 (SDXL), 17 (SD1/SD2), 20 (SDXL LyCORIS) or 26 (all blocks) values, or a preset: " + ", ".join(PRESETS)


def parse_values(text: str, what: str) -> tuple[float, ...]:
    """``"1,0,0.5,…"`` -> floats; R/U (random) and X (inherited) values and non-finite numbers are refused."""
    values = []
    for i, item in enumerate(t.strip() for t in text.split(",")):
        if item in ("R", "U"):
            raise ConfigError(f"{what}: value {i + 1} is {item!r}, a random value of the LoRA Block Weight "
                              "extension; stylelora does not draw random block weights (the picture could not be "
                              "made again): give numbers")
        if item.startswith("X"):
            raise ConfigError(f"{what}: value {i + 1} is {item!r}, the extension's inherited weight (x=…), which "
                              "stylelora does not support: give numbers")
        try:
            v = float(item)
        except ValueError:
            raise ConfigError(f"{what}: value {i + 1} ({item!r}) is not a number") from None
        if not math.isfinite(v):
            raise ConfigError(f"{what}: value {i + 1} is {item!r}; block weights must be finite numbers")
        values.append(v)
    return tuple(values)


PRESETS = {name: Blocks(values, name) for name, values in read_presets(PRESETS_TEXT, "built-in presets").items()}


def parse_blocks(text: str, what: str = "block weights") -> Blocks:
    """A preset name (case-sensitive, as in the extension) or a comma list of 12/17/20/26 numbers."""
    text = text.strip()
    if text in PRESETS:
        return PRESETS[text]
    if "," not in text:
        try:
            float(text)
        except ValueError:
            near = next((p for p in PRESETS if p.lower() == text.lower()), None)
            hint = f" (presets are case-sensitive: {near!r})" if near else ""
            raise ConfigError(f"{what}: unknown preset {text!r}{hint}; presets: {', '.join(PRESETS)}; or give "
                              "12, 17, 20 or 26 numbers separated by commas") from None
    values = parse_values(text, what)
    if len(values) == 61:
        raise ConfigError(f"{what}: 61 values are the extension's FLUX vector; stylelora has no FLUX base")
    if len(values) not in ORDERS:
        raise ConfigError(f"{what}: {len(values)} values in {text!r}; give {_lengths()}. The 17 are "
                          f"{','.join(BLOCKS_17)}")
    return Blocks(values)


def as_blocks(value, what: str = "block weights") -> Blocks:
    """A ``Blocks``, a preset name or comma list, or a sequence of numbers -> ``Blocks``."""
    if isinstance(value, Blocks):
        return value
    if isinstance(value, str):
        return parse_blocks(value, what)
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
        if len(value) not in ORDERS:
            raise ConfigError(f"{what}: {len(value)} values; give {_lengths()}")
        bad = [v for v in value if not math.isfinite(v)]
        if bad:
            raise ConfigError(f"{what}: {bad[0]!r} in {list(value)}; block weights must be finite numbers")
        return Blocks(tuple(float(v) for v in value))
    raise ConfigError(f"{what}: expected a preset name, a comma list or a sequence of numbers, got {value!r}")


def split_weight(value, what: str = "weight"):
    """A ``Blender.set`` value -> (plain weight, Blocks or None). Accepted: a number, a (unet, te) pair, a
    ``BlockWeight``, or (weight, blocks) where blocks is a ``Blocks``, a preset name or comma list, or a sequence
    of numbers (a pair's second item is one number)."""
    if isinstance(value, BlockWeight):
        return value.weight, value.blocks
    if isinstance(value, (tuple, list)) and len(value) == 2 and (
            isinstance(value[1], (Blocks, tuple, list)) or isinstance(value[1], str) and not is_number(value[1])):
        return value[0], as_blocks(value[1], f"block weights of {what}")
    return value, None


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a float (weights in specs and prompt tags)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


_SPEC_TAIL = re.compile(r"^[^:/\\]+$")


def split_spec(spec: str) -> tuple[str, Blocks | None]:
    """``FILE:W@BLOCKS`` -> ("FILE:W", Blocks); a spec without '@' (or whose '@' is in a path) -> (spec, None)."""
    head, at, tail = spec.rpartition("@")
    if not at or not head or not _SPEC_TAIL.match(tail):
        return spec, None
    return head, parse_blocks(tail, f"--lora {spec!r}: block weights after '@'")


# ------------------------------------------------------------------------------------ modules -> blocks
def block_of(component: str, path: str, unet_config) -> str | None:
    """The block of one adapter module: ``BASE`` for a text encoder, the ldm UNet block of a UNet module
    (``ldm.ldm_unet_path`` with the base's UNet config), None for a module in no block (multiplier 1)."""
    if component != "unet":
        return "BASE"
    from .ldm import ldm_unet_path

    ldm = ldm_unet_path(path, unet_config)
    if ldm is None:
        if path.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
            raise AdapterError(f"block weights: cannot tell the block of UNet module {path!r}")
        return None
    head = ldm.split(".")
    if head[0] == "middle_block":
        return "M00"
    if head[0] in ("input_blocks", "output_blocks"):
        block = f"{'IN' if head[0] == 'input_blocks' else 'OUT'}{int(head[1]):02d}"
        if block not in BLOCKS_26:
            raise AdapterError(f"block weights: UNet module {path!r} is in {block}, past the 26 blocks of A1111's "
                               "vectors")
        return block
    return None  # time_embed, label_emb, out: outside the extension's blocks


def multipliers(modules: dict, blocks: Blocks, unet_config) -> dict[tuple[str, str], float]:
    """{(component, path): multiplier} for an adapter's ``modules`` ({component: {path: module}})."""
    return {(comp, path): blocks.multiplier(block_of(comp, path, unet_config))
            for comp, mods in modules.items() for path in mods}


def unlisted(modules: dict, blocks: Blocks, unet_config) -> list[str]:
    """The blocks that hold some of ``modules`` but that ``blocks`` does not list (they get 0, as in A1111)."""
    found = {block_of(comp, path, unet_config) for comp, mods in modules.items() for path in mods}
    return [b for b in BLOCKS_26 if b in found and b not in blocks.ids]


def check_fit(name: str, modules: dict, blocks: Blocks, unet_config, family: str | None) -> None:
    """Warn (once per call) where a vector made for another family or layout zeroes blocks the adapter uses."""
    missing = unlisted(modules, blocks, unet_config)
    if not missing:
        return
    expected = FAMILY_LENGTHS.get(family or "", SD_LENGTHS)
    hint = (f"; a {family or 'this'} base takes {' or '.join(str(n) for n in expected)} values"
            if len(blocks.values) not in expected else "")
    log.warning("block weights %s of %r: blocks %s hold some of its modules but are not in the %d-value vector, "
                "so they get 0 (as A1111's LoRA Block Weight does)%s", blocks.text(), name, ", ".join(missing),
                len(blocks.values), hint)


def unet_config_for(adapter, pipe=None):
    """The UNet config whose ldm numbering names ``adapter``'s blocks: the base's (``pipe``), the built-in tiny
    base its metadata names, or the released architecture of its family if its UNet modules fit that one."""
    if pipe is not None:
        return pipe.unet.config
    from .formats.keys import tiny_spec

    tiny = tiny_spec(adapter.metadata)
    if tiny:
        from diffusers import UNet2DConditionModel

        from .models import ensure_tiny

        return UNet2DConditionModel.load_config(ensure_tiny(tiny) / "unet")
    from .formats.arch import ARCHS, builtin_table
    from .models import FAMILIES

    spec = FAMILIES.get(adapter.family or "")
    where = f"block weights of {adapter.name!r}"
    if spec is None or spec.arch not in ARCHS:
        raise AdapterError(f"{where}: the file does not say its model family, so its UNet blocks cannot be "
                           "numbered; pass --base (the base model)")
    table = builtin_table(spec.arch).components["unet"]
    shapes = {**table.shapes, **table.norms}
    for path, m in adapter.modules.get("unet", {}).items():
        out = m.up.shape[0] if hasattr(m, "up") else m.shape[0]
        if path not in shapes or shapes[path][0] != out:
            raise AdapterError(f"{where}: UNet module {path!r} does not fit the released {spec.name} layout (an "
                               "adapter for a model of another size?); pass --base (the base model) to number its "
                               "blocks")
    return ARCHS[spec.arch][1]
