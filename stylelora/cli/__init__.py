"""``stylelora`` command line: one module per command, each with ``register(subparsers)`` and a ``run(args)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..atomic import no_space_error
from ..errors import StyleloraError

# Command modules, in the order `stylelora --help` lists them. Each defines `register(subparsers)` and the
# parser it registers sets `func` to a function taking the parsed args and returning an exit code.
COMMANDS = ["train", "generate", "inspect", "convert", "merge", "bake", "webui"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylelora", description="Train, inspect, convert and blend LoRA style adapters for Stable Diffusion."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def quiet_libraries() -> None:
    """Library chatter (load bars, deprecation notes) hides our own messages; -v brings it back."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.verbose:
        quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except StyleloraError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        # a writer outside stylelora.atomic (a library's own file) that hit a full disk: say so, not errno 28
        full = no_space_error(e, getattr(e, "filename", None))
        if full is None or args.verbose:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
