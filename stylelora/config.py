"""Training configuration: one dataclass per concern, validated on creation and on every assignment, loadable from TOML.

Each field's ``help`` is also its CLI help; the CLI flag is the field name with dashes (``--te-lr``). A TOML file
uses one table per concern (``[data]``, ``[network]``, ``[optim]``, ``[run]``); unknown keys are an error.
The defaults of the training numbers (resolution, rank, learning rate, steps, ...) are the ``DEFAULT`` recipe of
stylelora/presets.py, where every recipe's numbers live.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .presets import DEFAULT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse's name
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
D = DEFAULT.overrides  # the default recipe: field defaults below are read from it, never written here
NETWORKS = ("lora", "adalora", "dora", "locon")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Upper bounds that keep a typo from hanging a run or exhausting memory before anything is reported: no base
# supported here samples beyond 4096 px (SDXL's native size is 1024), and 10M steps is years of training.
MAX_RESOLUTION = 4096
MAX_STEPS = 10_000_000
# What each simple annotation accepts (bool is an int in Python, so it is excluded from the numbers by hand).
_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
          "str": ((str,), "a string"), "list": ((list,), "a list"), "dict": ((dict,), "a table")}


def _check_types(obj) -> None:
    """Every field holds a value of its annotated type (``int``, ``float | None``, ...), numbers finite.

    TOML and Python callers can pass any type (``steps = 2.5``, ``rank = 8.0``, ``lr = "1e-4"``); refusing them
    here, by name, keeps them from surfacing later as a TypeError deep inside training."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        parts = [p.strip() for p in str(f.type).split("|")]
        if value is None and "None" in parts:
            continue
        kinds = [p.split("[")[0] for p in parts if p != "None"]
        if not kinds or any(k not in _KINDS for k in kinds):
            continue  # another annotation (a section, a Literal): the class's own checks cover it
        ok = any(isinstance(value, _KINDS[k][0]) and not (isinstance(value, bool) and k in ("int", "float"))
                 for k in kinds)
        if not ok:
            want = " or ".join(_KINDS[k][1] for k in kinds) + (" or none" if "None" in parts else "")
            hint = f" (write {int(value)})" if kinds == ["int"] and isinstance(value, float) and value.is_integer() \
                else ""
            raise ConfigError(f"{f.name} must be {want}, got {value!r} ({type(value).__name__}){hint}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


class _Validated:
    """Checks its fields (``_validate``) on creation and again on every later assignment.

    Tests and scripts adjust a config after building it (``cfg.optim.lr = 5e-2``), so the dataclasses stay
    mutable, but an assignment goes through the same checks as the constructor: an invalid value raises
    ``ConfigError`` and leaves the old one in place, and a misspelled field name raises instead of quietly adding
    an attribute that nothing reads. (Lists and dicts edited in place are not seen; assign a new one.)
    """

    def _validate(self) -> None:
        pass

    def _check_all(self) -> None:
        _check_types(self)  # first: the value checks below compare numbers
        self._validate()

    def __post_init__(self):
        self._check_all()
        object.__setattr__(self, "_ready", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get("_ready"):  # inside the dataclass __init__: __post_init__ checks everything
            object.__setattr__(self, name, value)
            return
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            raise ConfigError(f"{type(self).__name__} has no field {name!r}; fields: {', '.join(names)}")
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self._check_all()
        except (ConfigError, TypeError) as e:  # TypeError: a value of the wrong type met a comparison
            object.__setattr__(self, name, old)
            raise ConfigError(f"{type(self).__name__}.{name} = {value!r}: {e}") from e


@dataclass
class DataConfig(_Validated):
    """Where the images come from and how they become training samples."""

    folder: str = opt("", "image folder (searched recursively; captions from same-stem .txt/.caption files)")
    trigger: str | None = opt(None, "trigger word: used as caption where an image has none, and replaces {trigger}")
    caption_template: str = opt("{trigger}", "caption for images without a caption file")
    resolution: int = opt(D["resolution"], "training resolution: buckets have area <= resolution^2")
    bucket_step: int = opt(64, "bucket sides are multiples of this")
    upscale: bool = opt(False, "allow small images to be upscaled into a larger bucket")
    random_flip: bool = opt(False, "random horizontal flip (works with the latent cache: both sides are cached)")
    random_crop: bool = opt(False, "random instead of center crop into the bucket (disables the latent cache)")
    default_repeats: int = opt(1, "times each image is seen per epoch (a folder named N_name overrides)")
    repeats: dict = opt({}, "per-folder repeats {relative folder: count} (TOML only)", cli=False)
    skip_bad_images: bool = opt(False, "skip unreadable images with a warning instead of stopping")
    cache_latents: bool = opt(True, "encode each image once with the VAE and keep the latents on disk")
    cache_dir: str | None = opt(None, "cache folder (default: $STYLELORA_HOME/cache)")
    reg_folder: str | None = opt(None, "regularization images (prior preservation): trained beside the style images "
                                       "with their captions as written, never given the trigger, so the adapter "
                                       "learns to leave prompts without the trigger alone")
    caption_dropout: float = opt(D["caption_dropout"],
                                 "share of training images shown with an empty caption, so the adapter also "
                                 "learns the unconditional prediction that classifier-free guidance subtracts "
                                 "(without it, guidance can cancel much of a style); 0.05-0.2 typical")

    def _validate(self) -> None:
        _check(64 <= self.resolution <= MAX_RESOLUTION and self.resolution % self.bucket_step == 0,
               f"resolution must be in 64..{MAX_RESOLUTION} and a multiple of bucket_step ({self.bucket_step}), "
               f"got {self.resolution}")
        _check(self.bucket_step in (8, 16, 32, 64, 128), f"bucket_step must be 8, 16, 32, 64 or 128, got {self.bucket_step}")
        _check(1 <= self.default_repeats <= 10_000, f"default_repeats must be in 1..10000, got {self.default_repeats}")
        _check(0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        _check(all(isinstance(v, int) and v >= 1 for v in self.repeats.values()), "repeats values must be integers >= 1")


@dataclass
class NetworkConfig(_Validated):
    """The LoRA layers: where they go and how big they are."""

    rank: int = opt(D["rank"], "LoRA rank (network dim)")
    alpha: float | None = opt(None, "LoRA alpha; scale = alpha / rank (default: alpha = rank)")
    dropout: float = opt(0.0, "dropout on the LoRA path")
    unet_targets: list = opt(UNET_TARGETS, "UNet module names that get LoRA (comma-separated)")
    train_text_encoder: bool = opt(False, "also train LoRA on the text encoder")
    te_targets: list = opt(TE_TARGETS, "text-encoder module names that get LoRA (comma-separated)")
    train_tokens: int = opt(0, "pivotal tuning: the trigger word becomes this many new tokens in the tokenizer(s), "
                               "whose embeddings train with the LoRA and ship in the adapter (0 = off)")
    token_init: str | None = opt(None, "start the learnt tokens from this word's embedding (default: random vectors "
                                       "of the vocabulary's mean norm)")
    blend_ready: float = opt(0.0, "train for blending: in this share of the captions with the trigger, a stand-in for "
                                  "another adapter's learnt trigger (2 untrained tokens, new random vectors each step) "
                                  "sits right before or after it, so the style holds when a blend's prompt carries "
                                  "other trigger words too; needs --train-tokens (0 = off; 0.5 typical)")
    network: str = opt("lora", "lora: one fixed rank; adalora: per-module ranks chosen while training (AdaLoRA), "
                               "--rank is then the target average rank (--rank auto is the same as --network adalora); "
                               "dora: LoRA plus a trained magnitude per row or column (DoRA, --dora-layout); "
                               "locon: LoRA also on the UNet's ResNet and up/downsampler convolutions (kohya LoCon, "
                               "--conv-rank/--conv-alpha)")
    dora_layout: str = opt("in", "dora: the axis of the trained magnitude (dora_scale). in: one per input column, "
                                 "the layout AUTOMATIC1111 computes and ComfyUI reads right (OneTrainer writes it); "
                                 "out: one per output row, PEFT's own (lora_magnitude_vector), needed for --format "
                                 "peft and diffusers (docs/formats.md)")
    conv_rank: int | None = opt(None, "locon: rank of the 3x3 convolutions (kohya conv_dim; default: --rank); 1x1 "
                                      "convolutions and Linear layers use --rank")
    conv_alpha: float | None = opt(None, "locon: alpha of the 3x3 convolutions (kohya conv_alpha; default: "
                                         "conv_rank, a scale of 1)")
    init_rank: int | None = opt(None, "adalora: every module's starting rank, pruned down to --rank on average "
                                      "(default: 2 x --rank)")
    adalora_tinit: int | None = opt(None, "adalora: steps before ranks are pruned (default: a tenth of --steps)")
    adalora_tfinal: int | None = opt(None, "adalora: last steps that train the final ranks without pruning "
                                           "(default: a fifth of --steps)")
    adalora_delta_t: int = opt(10, "adalora: steps between two rank allocations")
    orth_reg_weight: float = opt(0.5, "adalora: weight of the orthogonality regulariser on P and Q")
    slot: int | None = opt(None, "orthogonal slot for blending (0, 1, ...): lora_down is frozen to this slot's rows of "
                                 "a fixed orthogonal basis per layer and only lora_up trains, so adapters trained in "
                                 "different slots (same --rank) do not overlap when blended; the file stays a plain "
                                 "kohya LoRA (default: off)")

    def _validate(self) -> None:
        _check(1 <= self.rank <= 1024, f"rank must be in 1..1024, got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, "alpha must be > 0")
        _check(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        _check(bool(self.unet_targets) or self.train_text_encoder, "nothing to train: unet_targets is empty")
        _check(0 <= self.train_tokens <= 64, f"train_tokens must be in 0..64, got {self.train_tokens}")
        _check(0.0 <= self.blend_ready <= 1.0, f"blend_ready must be in [0, 1], got {self.blend_ready}")
        _check(not self.blend_ready or self.train_tokens > 0,
               f"blend_ready = {self.blend_ready} puts stand-ins for other learnt trigger words into the captions, "
               "which needs learnt trigger tokens: add --train-tokens 2 (and --trigger WORD), or drop --blend-ready")
        _check(self.network in NETWORKS, f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        _check(self.dora_layout in ("in", "out"), f"dora_layout must be in or out, got {self.dora_layout!r}")
        _check(self.conv_rank is None or 1 <= self.conv_rank <= 1024, f"conv_rank must be in 1..1024, got "
                                                                        f"{self.conv_rank}")
        _check(self.conv_alpha is None or self.conv_alpha > 0, "conv_alpha must be > 0")
        _check((self.conv_rank is None and self.conv_alpha is None) or self.network == "locon",
               f"conv_rank/conv_alpha size the LoRA on convolutions, which only network locon trains (network is "
               f"{self.network}): add --network locon, or drop --conv-rank/--conv-alpha")
        _check(self.init_rank is None or 2 <= self.init_rank <= 1024,
               f"init_rank must be in 2..1024, got {self.init_rank}")
        _check(all(v is None or v >= 0 for v in (self.adalora_tinit, self.adalora_tfinal)),
               "adalora_tinit and adalora_tfinal must be >= 0")
        _check(self.adalora_delta_t >= 1, f"adalora_delta_t must be >= 1, got {self.adalora_delta_t}")
        _check(self.orth_reg_weight >= 0, f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        _check(self.slot is None or 0 <= self.slot <= 1023, f"slot must be in 0..1023, got {self.slot}")
        _check(self.slot is None or self.network == "lora",
               f"slot needs network lora: {self.network} trains and prunes the lora_down rows a slot freezes; "
               "drop --slot or use --network lora")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def conv_lora_rank(self) -> int:
        """locon: the rank of the 3x3 convolutions."""
        return int(self.rank if self.conv_rank is None else self.conv_rank)

    @property
    def conv_lora_alpha(self) -> float:
        return float(self.conv_lora_rank if self.conv_alpha is None else self.conv_alpha)


@dataclass
class OptimConfig(_Validated):
    """Optimizer, learning rates and loss weighting."""

    lr: float = opt(D["lr"], "learning rate for the UNet LoRA")
    te_lr: float | None = opt(None, "learning rate for the text-encoder LoRA (default: lr)")
    optimizer: str = opt("adamw", "adamw | adamw8bit (needs bitsandbytes)")
    weight_decay: float = opt(D["weight_decay"], "AdamW weight decay")
    max_grad_norm: float = opt(D["max_grad_norm"], "gradient clipping norm (0 = off)")
    lr_scheduler: str = opt(D["lr_scheduler"],
                            "constant | constant_with_warmup | linear | cosine | cosine_with_restarts | polynomial")
    warmup_steps: int = opt(D["warmup_steps"], "learning-rate warmup steps")
    min_snr_gamma: float | None = opt(D["min_snr_gamma"], "min-SNR-gamma loss weighting (0 or none = off)")
    noise_offset: float = opt(D["noise_offset"], "noise offset (helps very dark/bright styles); 0.05-0.1 typical")
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule to zero terminal SNR (needs v-prediction)")
    token_lr: float = opt(5e-3, "learning rate of the learnt trigger tokens (--train-tokens); 5e-3 is AUTOMATIC1111's "
                                "textual-inversion default")
    token_stop: float = opt(0.5, "share of the steps the learnt tokens train for; they stay fixed after it while the "
                                 "LoRA goes on (0.5 as diffusers' train_text_encoder_ti_frac)")

    def _validate(self) -> None:
        _check(self.lr > 0, "lr must be > 0")
        _check(self.te_lr is None or self.te_lr >= 0, "te_lr must be >= 0")
        _check(self.optimizer in ("adamw", "adamw8bit"), f"optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        _check(self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {', '.join(SCHEDULERS)}")
        _check(0 <= self.warmup_steps <= MAX_STEPS, f"warmup_steps must be in 0..{MAX_STEPS}")
        _check(self.token_lr > 0, "token_lr must be > 0")
        _check(0.0 < self.token_stop <= 1.0, f"token_stop must be in (0, 1], got {self.token_stop}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            object.__setattr__(self, "min_snr_gamma", None)  # 0 means off; not a change to validate


@dataclass
class RunConfig(_Validated):
    """The run itself: base model, output, length, precision, checkpoints and samples."""

    base: str = opt("tiny", "base model: 'tiny', a diffusers folder, a .safetensors checkpoint or a hub id")
    base_config: str | None = opt(None, "diffusers folder with the config of a single-file --base (offline use)")
    output: str = opt("adapter.safetensors", "adapter file to write")
    format: str = opt("kohya", "adapter layout: kohya (A1111/ComfyUI/kohya/diffusers) | peft")
    steps: int = opt(D["steps"], "optimizer steps")
    batch_size: int = opt(D["batch_size"], "images per step per process")
    grad_accum: int = opt(1, "gradient accumulation steps")
    mixed_precision: str = opt("no", "no | fp16 | bf16 (LoRA weights always stay fp32)")
    quantize_base: str | None = opt(None, "store the frozen base quantized (QLoRA): fp8 (float8 weights with "
                                          "per-channel scales, CPU and GPU) | int8 | nf4 (bitsandbytes, CUDA only) | "
                                          "int8-torchao (torchao int8 weight-only Linear layers; pip install "
                                          "torchao); the adapter stays fp32 and loads on any base")
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet")
    channels_last: bool = opt(False, "channels-last memory format for the UNet (often faster convolutions on GPU)")
    compile: bool = opt(False, "torch.compile the UNet forward (pays off on long GPU runs; slow first steps)")
    seed: int = opt(0, "seed for noise, timesteps, data order and LoRA init")
    prediction_type: str | None = opt(None, "override the base's prediction type: epsilon | v_prediction")
    checkpoint_every: int = opt(0, "write a resumable checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(3, "how many checkpoints to keep")
    save_every: int = opt(0, "also write a loadable adapter NAME-step-N.safetensors beside the output every N steps "
                             "(kohya/peft layout and metadata like the final one; 0 = off)")
    resume: str | None = opt(None, "'latest' or a checkpoint folder to resume from")
    sample_every: int = opt(0, "write sample images every N steps (0 = off)")
    sample_prompts: list = opt([], "prompts for sample images (default: the trigger word)")
    sample_steps: int = opt(20, "denoising steps for sample images")
    sample_seed: int = opt(1234, "seed for sample images")
    log_every: int = opt(10, "log loss / check for NaN every N steps")
    tensorboard_dir: str | None = opt(None, "write TensorBoard logs here (needs tensorboard)")

    def _validate(self) -> None:
        _check(1 <= self.steps <= MAX_STEPS, f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        _check(1 <= self.batch_size <= 4096 and 1 <= self.grad_accum <= 4096,
               "batch_size and grad_accum must be in 1..4096")
        _check(self.checkpoint_every >= 0 and self.sample_every >= 0 and self.save_every >= 0,
               "checkpoint_every, sample_every and save_every must be >= 0")
        _check(1 <= self.sample_steps <= 1000, f"sample_steps must be in 1..1000, got {self.sample_steps}")
        _check(0 <= self.seed < 2**63, f"seed must be in 0..2**63-1, got {self.seed}")
        _check(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision must be no, fp16 or bf16")
        _check(self.quantize_base in (None, "fp8", "int8", "nf4", "int8-torchao"),
               f"quantize_base must be fp8, int8, nf4 or int8-torchao (or left out for a full-precision base), "
               f"got {self.quantize_base!r}")
        _check(self.format in ("kohya", "peft"), f"format must be kohya or peft, got {self.format!r}")
        _check(self.prediction_type in (None, "epsilon", "v_prediction"), "prediction_type must be epsilon or v_prediction")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        _check(self.log_every >= 1, "log_every must be >= 1")


SECTIONS = {"data": DataConfig, "network": NetworkConfig, "optim": OptimConfig, "run": RunConfig}


@dataclass
class TrainConfig(_Validated):
    """Everything a training run needs. ``TrainConfig(data=DataConfig("imgs"), run=RunConfig(output="a.safetensors"))``.

    A named recipe of stylelora/presets.py builds one with ``RECIPES[name].config(folder=..., output=...)``.
    """

    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def _validate(self) -> None:
        for name, klass in SECTIONS.items():
            _check(isinstance(getattr(self, name), klass), f"{name} must be a {klass.__name__}")
        _check(not self.network.train_tokens or bool(self.data.trigger),
               f"train_tokens = {self.network.train_tokens} needs a trigger word ([data] trigger, --trigger WORD): "
               "the learnt tokens stand for it in captions and prompts")
        _check(self.network.network != "dora" or self.network.dora_layout == "out" or self.run.format != "peft",
               "format peft with network dora needs dora_layout out: PEFT's DoRA magnitude (lora_magnitude_vector) "
               "is one per output row, and the two layouts are not convertible: add --dora-layout out, or write "
               "--format kohya")
        _check(self.network.network != "dora" or self.run.quantize_base is None,
               f"network dora needs a full-precision base (quantize_base is {self.run.quantize_base}): DoRA normalises "
               "the base weight plus the update on every step; drop --quantize-base or use --network lora")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def get(self, key: str) -> Any:
        """The value of a field by its flat name (``cfg.get("rank")`` is ``cfg.network.rank``)."""
        return getattr(getattr(self, _owner(key)), key)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config", base: "TrainConfig | None" = None
                  ) -> "TrainConfig":
        """Build from ``{section: {key: value}}`` over ``base`` (default: the field defaults); unknown sections or
        keys are an error naming them."""
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; allowed: {sorted(SECTIONS)}")
        parts = {}
        start = base.to_dict() if base is not None else {}
        for name, klass in SECTIONS.items():
            values = dict(d.get(name) or {})
            names = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - names
            if bad:
                raise ConfigError(f"{source}: unknown key(s) in [{name}]: {sorted(bad)}; allowed: {sorted(names)}")
            try:
                parts[name] = klass(**{**start.get(name, {}), **values})
            except (TypeError, ConfigError) as e:
                raise ConfigError(f"{source}: [{name}]: {e}") from e
        return cls(**parts)

    @classmethod
    def from_toml(cls, path: str | Path, *, base: "TrainConfig | None" = None) -> "TrainConfig":
        """Read a TOML file; keys it does not set keep ``base``'s values (default: the field defaults)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        return cls.from_dict(data, source=str(path), base=base)

    def differences(self, base: "TrainConfig | None" = None) -> dict[str, Any]:
        """``{flat field: value}`` of the fields whose value differs from ``base`` (default: the field defaults),
        in section order."""
        start = (base or TrainConfig()).to_dict()
        return {k: v for section, values in self.to_dict().items() for k, v in values.items()
                if start[section][k] != v}

    def summary(self, recipe: str = "default") -> str:
        """The effective recipe, printed at the start of a run: the recipe's name and every field that differs
        from the ``TrainConfig`` defaults (what a user would have to pass to train this exact run again)."""
        diffs = self.differences()
        lines = [f"recipe: {recipe}" + (" (the TrainConfig defaults)" if recipe == "default" else "")]
        for section in SECTIONS:
            own = {f.name for f in dataclasses.fields(SECTIONS[section])}
            shown = [f"{k}={_show(v)}" for k, v in diffs.items() if k in own]
            if shown:
                lines.append(f"  {section}: " + ", ".join(shown))
        if not diffs:
            lines.append("  (no field differs from the defaults)")
        return "\n".join(lines)

    def replace(self, **flat: Any) -> "TrainConfig":
        """A copy with flat overrides (``rank=8``, ``lr=1e-4``) applied to whichever section owns each key,
        validated like a new config."""
        d = self.to_dict()
        for key, value in flat.items():
            d[_owner(key)][key] = value
        return TrainConfig.from_dict(d)


def _owner(key: str) -> str:
    """The section that owns flat field name ``key``."""
    for section, klass in SECTIONS.items():
        if any(f.name == key for f in dataclasses.fields(klass)):
            return section
    raise ConfigError(f"unknown option {key!r}")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
