"""``stylelora train FOLDER -o OUT.safetensors [--config train.toml] [flags]``: flags come from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading

from ..config import SECTIONS, TrainConfig
from ..presets import RECIPES, for_base
from . import add_threads_arg

SHORT = {"output": ["-o"], "config": ["-c"]}
ONE_PER_FLAG = {"sample_prompts"}  # list options whose values contain commas


def register(sub) -> None:
    p = sub.add_parser("train", help="train a style adapter from a folder of images",
                       description="Train a LoRA style adapter. Settings: defaults < --recipe < --config TOML < flags.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", nargs="?", help="image folder (overrides [data] folder in --config)")
    p.add_argument("-c", "--config", help="TOML file with [data], [network], [optim], [run] tables")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="start from a named recipe of stylelora/presets.py instead of the defaults; "
                        + "; ".join(f"{r.name}: {r.base}" for r in RECIPES.values()))
    for section, klass in SECTIONS.items():
        group = p.add_argument_group(section, klass.__doc__)
        for f in dataclasses.fields(klass):
            if f.name == "folder" or not f.metadata.get("cli", True):
                continue
            flags = SHORT.get(f.name, []) + ["--" + f.name.replace("_", "-")]
            kw = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS, "dest": f.name}
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if f.name in ONE_PER_FLAG:
                # prompts hold commas ("trigger, a red house"): one per flag or per line, never split on commas
                kw.update(action="extend", type=_lines)
                kw["help"] += " (one per flag, repeat the flag for more, or one per line)"
            elif isinstance(default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, list):
                kw["type"] = _comma_list
            elif f.name == "reg_folder":
                kw["type"] = _str_or_none
                kw["help"] += "; none = no regularization images; toy:plain = the toy world's plain pictures"
            elif f.name == "rank":
                kw["type"] = _rank
                kw["help"] += "; auto = AdaLoRA (--network adalora) with the default target rank"
            elif f.type in ("int", int) or isinstance(default, int):
                kw["type"] = int
            elif f.type == "int | None":
                kw["type"] = _int_or_none
            elif isinstance(default, float) or "float" in str(f.type):
                kw["type"] = _float_or_none
            kw["help"] += f" (default: {default!r})"
            group.add_argument(*flags, **kw)
    add_threads_arg(p)
    p.set_defaults(func=run, precheck=precheck)


def _lines(s: str) -> list[str]:
    return [x.strip() for x in s.splitlines() if x.strip()]


def _comma_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _str_or_none(s: str):
    return None if s.strip().lower() in ("none", "off", "") else s


def _float_or_none(s: str):
    return None if s.lower() in ("none", "off") else float(s)


def _int_or_none(s: str):
    return None if s.lower() in ("none", "off") else int(s)


def _rank(s: str):
    return "auto" if s.strip().lower() == "auto" else int(s)


def recipe_of(args):
    """The recipe a run starts from: ``--recipe`` (default: the TrainConfig defaults), scaled for the base the
    flags or the TOML file name (``presets.for_base``: the toy ``tiny`` base, the default, gets its own numbers)."""
    return _recipe_and_plain(args)[0]


def _recipe_and_plain(args):
    recipe = RECIPES[getattr(args, "recipe", None) or "default"]
    plain = _layered(args, recipe)  # where the base and the trigger word come from: flags, TOML or the recipe
    return for_base(recipe, plain.run.base, trigger=bool(plain.data.trigger)), plain


def config_from_args(args) -> TrainConfig:
    recipe, plain = _recipe_and_plain(args)
    # the final trigger goes in with the recipe: a scaled recipe's learnt tokens need it from the first layer on
    return _layered(args, recipe, trigger=plain.data.trigger)


def _layered(args, recipe, **first) -> TrainConfig:
    """recipe (with ``first``) < --config TOML < flags."""
    cfg = recipe.config(**first)
    if args.config:
        cfg = TrainConfig.from_toml(args.config, base=cfg)
    reserved = {"command", "func", "precheck", "config", "recipe", "verbose", "folder", "threads"}
    overrides = {k: v for k, v in vars(args).items() if k not in reserved}
    if args.folder:
        overrides["folder"] = args.folder
    if overrides.get("rank") == "auto":  # --rank auto: AdaLoRA, the target rank left at its default
        del overrides["rank"]
        overrides["network"] = "adalora"
    return cfg.replace(**overrides)


def check_paths(cfg: TrainConfig) -> None:
    """The path mistakes a user makes most, answered before torch is imported (seconds on a busy machine);
    training.train checks them again, and everything else, for callers of the Python API."""
    from pathlib import Path

    from ..errors import ConfigError, DataError

    from ..presets import TOY_PLAIN

    for label, folder in (("dataset", cfg.data.folder), ("regularization", cfg.data.reg_folder)):
        if not folder or folder == TOY_PLAIN:  # the built-in toy set is written when training starts
            continue
        root = Path(folder).expanduser().absolute()
        if not root.exists():
            raise DataError(f"{label} folder {root} does not exist. Check the path.")
        if not root.is_dir():
            raise DataError(f"{label} path {root} is a file, not a folder. Pass the folder that holds the images.")
    if not cfg.data.folder:
        raise ConfigError("no image folder given (the first argument of `stylelora train`, or [data] folder)")
    if Path(cfg.run.output).suffix != ".safetensors":
        raise ConfigError(f"output {cfg.run.output} must end in .safetensors")


def precheck(args) -> None:
    """Run by cli.main before torch/diffusers are imported: a wrong path is answered in well under a second."""
    check_paths(config_from_args(args))


def run(args) -> int:
    cfg = config_from_args(args)
    from .. import training
    from ..errors import TrainingCancelled

    from accelerate import PartialState

    # one block, before the dataset summary and the progress bar, from the first process only. Read from the
    # launcher's environment: creating accelerate's PartialState here, before train() builds its Accelerator,
    # left every process of `accelerate launch` alone in a world of 1.
    first = os.environ.get("RANK", "0") == "0"
    if first:
        print(cfg.summary(recipe_of(args).name), flush=True)
    with _StopOnSignal() as stop:
        try:
            path = training.train(cfg, should_stop=stop.requested,
                                  on_data=lambda summary: first and print(summary.format(), flush=True))
        except TrainingCancelled as e:
            if stop.signum is None:
                raise
            if PartialState().is_main_process:
                print(f"{signal.Signals(stop.signum).name}: {e}", file=sys.stderr)  # it says how to resume
            return 128 + stop.signum  # the shell's code for "ended by this signal", after a clean stop
    if PartialState().is_main_process:
        print(f"wrote {path}")
    return 0


class _StopOnSignal:
    """SIGTERM (schedulers, ``docker stop``) and SIGINT (Ctrl-C) stop training like the web UI's Stop button: the
    run finishes its step, writes a checkpoint and returns. A second signal ends the process at once (the previous
    handler, e.g. KeyboardInterrupt, takes over). The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop waiting for the step
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this step and writing a checkpoint "
              "(send it again to quit at once)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
