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
COMMANDS = ["train", "generate", "inspect", "convert", "merge", "blend_report", "resize", "bake", "webui"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylelora", description="Train, inspect, convert and blend LoRA style adapters for Stable Diffusion."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads: CPU threads for torch (train, generate, bake, webui)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads torch may use (default on CPU runs: min(physical cores, 4), or "
                        "$OMP_NUM_THREADS when set; on a GPU torch's own default). Many threads on a busy or small "
                        "machine make CPU training many times slower than few")


def physical_cores() -> int:
    """Cores this process may run on, without hyper-threading siblings (psutil when installed)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        return max(1, min(usable, psutil.cpu_count(logical=False) or usable))
    except ImportError:
        return max(1, usable)


def default_threads(device: str | None) -> int | None:
    """The thread count for a run on ``device`` ("auto"/None: cuda or mps when present, else cpu); None leaves
    torch's default (GPU runs, or a user's $OMP_NUM_THREADS). torch's default (every logical core) made CPU
    training 12-17x slower than one thread on a busy 2-core machine: threads fight each other and other work."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if device in (None, "auto"):
        import torch

        on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    else:
        on_cpu = str(device).split(":")[0] == "cpu"
    return min(physical_cores(), 4) if on_cpu else None


def apply_threads(args) -> int | None:
    """Set torch's intra-op threads from --threads or the CPU default; returns the count set (None: unchanged)."""
    if getattr(args, "command", None) is None or not hasattr(args, "threads"):
        return None
    n = args.threads
    if n is not None and n < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--threads must be 1 or more, not {n}")
    if n is None:
        n = default_threads(getattr(args, "device", None))
    if n is not None:
        import torch

        torch.set_num_threads(n)
    return n


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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (skipped images, unused repeats) read as messages to the user: ``warning: …``, not
    Python's ``path.py:351: UserWarning: …`` followed by the source line that raised it."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.verbose:  # -v keeps Python's form, with the file and line that warned
        import warnings

        warnings.showwarning = _show_warning
    try:
        # argument checks that need no torch come first: quiet_libraries imports diffusers (seconds)
        if getattr(args, "precheck", None):
            args.precheck(args)
        if not args.verbose:
            quiet_libraries()
        apply_threads(args)
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
