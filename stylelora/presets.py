"""Training recipes: the one place where the numbers of every training recipe are written.

A recipe is a named, documented set of overrides of ``TrainConfig`` fields (flat names, as in
``TrainConfig.replace``). Who reads which:

- ``DEFAULT``: the field defaults of ``TrainConfig`` itself (stylelora/config.py reads them from here), so a bare
  ``stylelora train`` or a TOML file without these keys trains this recipe. For SD1.x/SD2.x bases at 512 px.
- ``WEBUI``: the web UI's presets ``quick``, ``standard`` and ``thorough``, overrides of ``DEFAULT``. For real
  bases (SD1.x, SD2.x, SDXL) at their native size; the web UI sets the resolution from the base.
- ``TOY`` and ``TOY_NO_REG``: the demo's and benchmarks/style_quality.py's recipe for a toy-world style on the
  64 px ``tiny`` base (``stylelora.toy.world.train_config`` fills in the folders and the trigger).

Changing a number here changes what that recipe trains everywhere; the README's "Style quality" section records
what was measured for the toy recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # config.py imports this module for its defaults, so it is imported late at run time
    from .config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """A named set of ``TrainConfig`` overrides. ``recipe.config(folder=..., output=...)`` builds a config."""

    name: str
    base: str  # which base (and size) the numbers were chosen for
    note: str  # what it is for, shown in the web UI and in ``describe()``
    overrides: Mapping[str, Any]

    def __post_init__(self):
        # read-only, so that no caller can change a recipe for everyone else by editing its dict
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))

    def __getitem__(self, key: str) -> Any:
        """The value of field ``key`` under this recipe: its override, else the ``TrainConfig`` default."""
        if key in self.overrides:
            return self.overrides[key]
        from .config import TrainConfig

        return TrainConfig().get(key)

    def config(self, config: "TrainConfig | None" = None, **more: Any) -> "TrainConfig":
        """``config`` (default: a fresh ``TrainConfig``) with this recipe's overrides, then ``more``, applied."""
        from .config import TrainConfig

        return (config or TrainConfig()).replace(**{**self.overrides, **more})

    def describe(self) -> str:
        return f"{self['steps']} steps, rank {self['rank']}, learning rate {self['lr']:g}: {self.note}"


DEFAULT = Recipe(
    "default", base="SD1.x/SD2.x at 512 px", note="the TrainConfig defaults",
    overrides={
        "resolution": 512, "caption_dropout": 0.0,
        "rank": 16,
        "lr": 1e-4, "weight_decay": 1e-2, "max_grad_norm": 1.0, "lr_scheduler": "constant", "warmup_steps": 0,
        "min_snr_gamma": 5.0, "noise_offset": 0.0,
        "steps": 1000, "batch_size": 1,
    },
)

# The web UI's presets, in the order it shows them.
WEBUI = {r.name: r for r in (
    Recipe("quick", base="SD1.x/SD2.x/SDXL at native size", note="a first look at a style in a few minutes on a GPU",
           overrides={"steps": 400, "rank": 8, "lr": 2e-4}),
    Recipe("standard", base="SD1.x/SD2.x/SDXL at native size", note="a good default for 10-40 images",
           overrides={"steps": 1200, "rank": 16, "lr": 1e-4}),
    Recipe("thorough", base="SD1.x/SD2.x/SDXL at native size",
           note="for larger or more detailed sets; watch the samples for overfitting",
           overrides={"steps": 3000, "rank": 32, "lr": 1e-4}),
)}
WEBUI_DEFAULT = "standard"

# Rank-8 LoRA on the UNet attention and the text encoder at 64 px (the toy world's picture size), batch 4, no
# random flips (toy captions say "left" and "right"), 10 % empty captions. The text encoder's LoRA gets the UNet's
# learning rate: the trigger is spelled byte by byte and this small text encoder has to learn to turn it into a
# style. 300 steps on the style set plus plain pictures as regularization images (about 50 s on 2 CPU cores).
TOY = Recipe(
    "toy", base="the 64 px tiny base (toy world)",
    note="a toy-world style with plain pictures as regularization images",
    overrides={
        "base": "tiny", "resolution": 64, "caption_dropout": 0.1,
        "rank": 8, "train_text_encoder": True,
        "lr": 1e-3, "te_lr": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 10,
        "steps": 300, "batch_size": 4, "seed": 0, "log_every": 25,
        # pivotal tuning: the trigger becomes 2 learnt tokens (lr 2e-2, trained for the first half of the steps),
        # started from the word the base knows for the style's look family ("striped", "faded", ...; filled in by
        # stylelora.toy.world.train_config). Measured best of the token recipes tried (README "Style quality").
        "train_tokens": 2, "token_lr": 2e-2,
    },
)
# Without regularization images there are half as many pictures per epoch: half the steps.
TOY_NO_REG = Recipe("toy-no-reg", base=TOY.base, note="a toy-world style on the style set alone",
                    overrides={**TOY.overrides, "steps": TOY.overrides["steps"] // 2})

RECIPES = {r.name: r for r in (DEFAULT, *WEBUI.values(), TOY, TOY_NO_REG)}

# The toy world's plain pictures (no style, captions without a trigger) as a reg_folder value: resolved to a folder
# written once under $STYLELORA_HOME by stylelora.toy.world.plain_folder (the same 24 pictures as examples/plain).
TOY_PLAIN = "toy:plain"
TOY_BASES = ("tiny",)  # the entries of models.TINY that are the toy base (models imports torch; the CLI must not)

# The same recipes scaled for the 64 px toy ``tiny`` base (what a bare ``stylelora train`` uses, and the base a new
# user tries first). The real-base numbers (lr 1e-4, text encoder off, random tokens off) teach it nothing in their
# step counts: measured on benchmarks/style_quality.py, README "Style quality". So on ``tiny`` every recipe takes
# the toy recipe's optimiser and pivotal tuning (learnt trigger tokens; without a token_init they start from random
# vectors) and keeps its own place on the quick < standard < thorough scale through steps and rank. It also takes
# the toy world's plain pictures as regularization images unless the run names its own (--reg-folder DIR, or
# --reg-folder none for none): measured, the style set alone gave stripes 0 % and pastel 25 % fidelity where the
# same recipe with the plain pictures gave 95 % and 70 % (README "Style quality").
TINY_SCALE = {**{k: v for k, v in TOY.overrides.items() if k not in ("steps", "rank", "seed", "log_every")},
              "reg_folder": TOY_PLAIN}
TINY_STEPS_RANK = {"default": (300, 8), "quick": (150, 4), "standard": (300, 8), "thorough": (600, 16)}


def is_toy_base(base: str | None) -> bool:
    """Whether ``base`` names the built-in pretrained toy base (``tiny``), the one the tiny scale is for."""
    return str(base) in TOY_BASES


def for_base(recipe: "Recipe | str", base: str | None, *, trigger: bool = True) -> Recipe:
    """``recipe`` as it trains on ``base``: on the toy ``tiny`` base, its tiny-scaled version (``TINY_SCALE``, the
    steps and rank of ``TINY_STEPS_RANK``), named ``<name>@tiny``; on any other base (and for recipes with no tiny
    scale, such as ``toy`` itself) the recipe unchanged. ``trigger=False`` (a run with no trigger word): the tiny
    scale learns no trigger tokens, since there is no word for them to stand for."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    if not is_toy_base(base) or recipe.name not in TINY_STEPS_RANK:
        return recipe
    steps, rank = TINY_STEPS_RANK[recipe.name]
    scale = TINY_SCALE if trigger else {k: v for k, v in TINY_SCALE.items() if k not in ("train_tokens", "token_lr")}
    return Recipe(f"{recipe.name}@tiny", base=TOY.base, note=f"{recipe.note}, scaled for the 64 px tiny base",
                  overrides={**recipe.overrides, **scale, "steps": steps, "rank": rank})
