"""`stylelora --help` and argument mistakes answer without importing torch; --threads and the CPU default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# a fresh interpreter: does running the CLI with these arguments import torch? (torch takes seconds to import)
PROBE = """
import sys
from stylelora.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("RC", rc, "TORCH", "torch" in sys.modules)
"""


def probe(*argv: str) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1], out.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["generate", "--help"], ["convert", "--help"]])
def test_help_does_not_import_torch(argv):
    line, _ = probe(*argv)
    assert line == "RC 0 TORCH False"


def test_train_path_mistakes_are_answered_before_torch(tmp_path):
    line, err = probe("train", str(tmp_path / "missing"), "-o", str(tmp_path / "x.safetensors"))
    assert line == "RC 2 TORCH False" and "missing does not exist" in err
    (tmp_path / "imgs").mkdir()
    line, err = probe("train", str(tmp_path / "imgs"), "-o", str(tmp_path / "x.bin"))
    assert line == "RC 2 TORCH False" and "must end in .safetensors" in err
    line, err = probe("train", str(tmp_path / "imgs"), "-o", str(tmp_path / "x.safetensors"),
                      "--reg-folder", str(tmp_path / "noreg"))
    assert line == "RC 2 TORCH False" and "regularization folder" in err and "noreg" in err


def test_generate_and_bake_reference_mistakes_are_answered_before_torch(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    line, err = probe("generate", "a lighthouse", "--lora", f"{missing}:0.5")
    assert line == "RC 2 TORCH False" and f"{missing!r}: no such file" in err
    line, err = probe("bake", "--lora", "ink.safetensors:abc", "-o", str(tmp_path / "m"))
    assert line == "RC 2 TORCH False" and "weight 'abc' is not a number" in err
    line, err = probe("generate", "a lighthouse", "--adapters", str(tmp_path / "nodir"))
    assert line == "RC 2 TORCH False" and "not a folder" in err


def test_convert_choices_are_the_writable_formats():
    from stylelora.cli import build_parser
    from stylelora.formats import FORMATS

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["convert"]._actions
                  if a.dest == "to")
    assert tuple(action.choices) == tuple(FORMATS) + ("lora",)  # lora: a plain kohya LoRA by SVD (any type in)


def test_threads_flag_and_cpu_default(monkeypatch):
    import torch

    from stylelora import cli

    before = torch.get_num_threads()
    try:
        args = cli.build_parser().parse_args(["generate", "x", "--base", "tiny", "--threads", "3"])
        assert cli.apply_threads(args) == 3 and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        usable = len(os.sched_getaffinity(0))
        try:
            import psutil
            cores = min(usable, psutil.cpu_count(logical=False) or usable)
        except ImportError:
            cores = usable
        args = cli.build_parser().parse_args(["generate", "x", "--base", "tiny", "--device", "cpu"])
        assert cli.apply_threads(args) == min(cores, 4) and torch.get_num_threads() == min(cores, 4)
        assert cli.default_threads("cuda:1") is None  # GPU runs keep torch's default
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cli.default_threads("cpu") is None  # the user's own setting wins
        with pytest.raises(Exception, match="--threads must be 1 or more"):
            cli.apply_threads(cli.build_parser().parse_args(["train", "imgs", "--threads", "0"]))
    finally:
        torch.set_num_threads(before)
