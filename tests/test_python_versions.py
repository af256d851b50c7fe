"""The lowest Python that pyproject.toml allows can compile the package and (with its dependencies) import it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
LOWEST = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", PROJECT["requires-python"]).groups())


def test_tomli_is_required_exactly_where_tomllib_is_missing():
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    tomli = [r for r in reqs if r.name == "tomli"]
    assert len(tomli) == 1, "stylelora.config imports tomli on Python < 3.11: declare it in pyproject.toml"
    # tomllib entered the standard library in 3.11 (PEP 680)
    for version, needed in [(f"{LOWEST[0]}.{LOWEST[1]}", LOWEST < (3, 11)), ("3.11", False), ("3.13", False)]:
        assert tomli[0].marker.evaluate({"python_version": version}) is needed, version


def _lowest_python() -> str:
    """``$STYLELORA_LOWEST_PYTHON`` or ``python3.X`` on PATH, if it runs and is that version; else skip."""
    name = f"python{LOWEST[0]}.{LOWEST[1]}"
    exe = os.environ.get("STYLELORA_LOWEST_PYTHON") or shutil.which(name)
    if not exe:
        pytest.skip(f"no {name} on PATH (set STYLELORA_LOWEST_PYTHON to one)")
    done = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True)
    if done.returncode != 0 or tuple(map(int, done.stdout.split())) != LOWEST:
        pytest.skip(f"{exe} does not run as {name}: {(done.stderr or done.stdout).strip()[:200]}")
    return exe


COMPILE_ALL = """
import pathlib, sys
bad = []
for root in sys.argv[1:]:
    for f in sorted(pathlib.Path(root).rglob("*.py")):
        try:
            compile(f.read_bytes(), str(f), "exec", dont_inherit=True)
        except SyntaxError as e:
            bad.append(f"{f}:{e.lineno}: {e.msg}")
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def test_every_module_compiles_on_the_lowest_python():
    exe = _lowest_python()
    dirs = [str(ROOT / d) for d in ("stylelora", "benchmarks", "examples", "tests", "webui") if (ROOT / d).is_dir()]
    done = subprocess.run([exe, "-c", COMPILE_ALL, *dirs], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"syntax newer than Python {LOWEST}:\n{done.stdout}{done.stderr[-2000:]}"


def test_package_imports_on_the_lowest_python():
    exe = _lowest_python()
    modules = ["torch", "diffusers", "transformers", "peft", "safetensors", "PIL", "numpy"]
    modules += ["tomli"] if LOWEST < (3, 11) else []
    probe = subprocess.run([exe, "-c", f"import {', '.join(modules)}"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"{exe} lacks the dependencies ({probe.stderr.strip().splitlines()[-1][:200]}); "
                    "install the package into it to run this check")
    code = "import stylelora, stylelora.config, stylelora.presets, stylelora.cli; stylelora.TrainConfig()"
    done = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
