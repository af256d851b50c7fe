"""`make bench-gpu`: every GPU figure the project quotes, in one command, on one H100/H200, in at most 9 minutes.

    make bench-gpu                                   # = python benchmarks/gpu_suite.py (refuses without a CUDA GPU)
    python benchmarks/gpu_suite.py --dry-run         # every stage at toy sizes on the CPU (tiny bases, 64 px, 2 steps)
    python benchmarks/gpu_suite.py --prepare         # here, with pip and git: wheels into .whl/, checks .peer/
    python benchmarks/gpu_suite.py --only blend,blend-compiled   # some stages again

Stages, in priority order (each has a time budget; once the whole budget is spent the rest are skipped with a note):
facts (nvidia-smi, versions) · cuda-tests (`pytest -m gpu tests`) · train (benchmarks/train_throughput.py, SD1.5
512², batch 4 and 16, cached and re-encode, eager) · peer (diffusers' train_dreambooth_lora.py and `stylelora
train` on the same synthetic images, >= 200 steps, batch 4, rank 16, bf16, against a random-weight SD1.5 folder)
· blend (benchmarks/blend_latency.py, SD1.5 fp16, 30 steps: base, fused 1/3/5, PEFT unfused) · lowmem (peak
memory of SD1.5 and SDXL at batch 1 with gradient checkpointing, and 8-bit AdamW where bitsandbytes is installed)
· sdxl (SDXL 1024², batch 4, gradient checkpointing) · train-compiled (torch.compile'd UNet, batch 4 and 16) ·
blend-compiled (compiled UNet, recompilations after weight changes).

It writes docs/benchmarks/<gpu>-<date>.md (tables, goals of issue 19, a JSON block), the log beside it in
out/bench-gpu/, copies both into $OUT when that is set, and prints the tables. Running it again the same day
replaces that day's file.

On the device machine (the `run` tool; nothing there can reach a registry, and a plain `python3` holds torch,
transformers, accelerate, pytest and tensorboard but not diffusers):
  1. Here, once per session: `python benchmarks/gpu_suite.py --prepare` (pip downloads the diffusers and peft
     wheels this checkout is tested with into the ignored .whl/), and put the peer into the ignored .peer/ as
     benchmarks/fetch_peer.sh says (the session's `fetch` tool mirrors github:huggingface/diffusers).
  2. `run` with command `python3 benchmarks/gpu_suite.py` (what `make bench-gpu` runs there; `make` itself may be
     missing on that image), carry [".whl", ".peer"], timeout_s 600. The suite installs .whl/*.whl into a
     temporary folder and restarts itself with it first on PYTHONPATH (the machine's own packages stay untouched);
     .venv is never carried (a CPU build, and too large).
  3. Copy the returned docs/benchmarks file from files_at into docs/benchmarks/ and commit it; the README's
     Benchmarks section quotes the latest one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_suite_report import write_report  # noqa: E402

PEER = ROOT / ".peer" / "train_dreambooth_lora.py"
# diffusers v0.40.0, the newest release the session mirror holds (the installed diffusers may be newer; the example
# only asks check_min_version("0.40.0")). benchmarks/fetch_peer.sh fetches exactly this file.
PEER_COMMIT = "d035dcd7cc7c88e0a154609b62887d50bba9fdc2"
PEER_SHA256 = "97cf38b184cad2cc39e414f79b3f1a70cec3b97883350a4d2a3aa0e2533d7883"
WHEELS = ("diffusers", "peft")  # missing on the device machine's image, or of another version there
BUDGET_S = 540  # 9 minutes; the device tool's one command may run 10
PEER_STEPS, PEER_SKIP = 220, 20  # 200 timed steps after 20 of warm-up (allocator, cuDNN autotune, first caches)


class Skip(Exception):
    """A stage that cannot run here; the reason goes into the report."""


@dataclass
class Ctx:
    dry: bool
    deadline: float
    work: Path
    log: Path
    env: dict
    py: str = sys.executable
    results: dict = field(default_factory=dict)

    @property
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, cmd: list[str], budget: float, *, want_json: bool = True):
        """Run ``cmd`` (a list) for at most ``budget`` seconds or what is left; its output goes into the log."""
        limit = min(budget, self.left)
        if limit < 10:
            raise Skip(f"time budget spent ({self.left:.0f} s left)")
        with open(self.log, "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            try:
                done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=limit)
            except subprocess.TimeoutExpired as e:
                log.write(_text(e.stdout) + _text(e.stderr))
                err = TimeoutError(f"stopped after {limit:.0f} s (stage budget)")
                err.output = _text(e.stdout)  # what it printed so far (pytest's per-test lines)
                raise err from None
            log.write(done.stdout + done.stderr)
        if done.returncode != 0 and want_json:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-600:]}")
        if not want_json:
            return done
        return json.loads(done.stdout[done.stdout.index("{"):])


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


# ------------------------------------------------------------------------------------------------------- stages


def stage_facts(ctx: Ctx) -> dict:
    import importlib.metadata as md

    import torch

    facts = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
             "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": _git_commit()}
    for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "triton"):
        try:
            facts[name] = md.version(name)
        except md.PackageNotFoundError:
            facts[name] = None
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
        facts["gpu_count"] = torch.cuda.device_count()
        q = "name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():  # a field this driver lacks fails the query: facts go without
            facts["nvidia_smi"] = dict(zip(q.split(","), (v.strip() for v in smi.stdout.splitlines()[0].split(","))))
        else:
            facts["nvidia_smi_error"] = (smi.stderr or smi.stdout).strip()[-300:]
    else:
        facts["gpu"], facts["gpu_count"] = f"cpu ({os.cpu_count()} cores; dry run)", 0
    if PEER.exists():
        import hashlib

        digest = hashlib.sha256(PEER.read_bytes()).hexdigest()
        facts["peer"] = {"file": str(PEER.relative_to(ROOT)), "diffusers_commit": PEER_COMMIT, "sha256": digest,
                         "pinned": digest == PEER_SHA256}
    return facts


def _git_commit() -> str | None:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def stage_cuda_tests(ctx: Ctx) -> dict:
    # The dry run collects only the GPU test file (every test there skips without CUDA); the real run takes every
    # `gpu`-marked test wherever it lives. -v prints one line per test, so a budget cut still tells what passed.
    target = "tests/test_gpu.py" if ctx.dry else "tests"
    try:
        done = ctx.call([ctx.py, "-m", "pytest", "-v", "-m", "gpu", "-rfEs", "-p", "no:cacheprovider", target], 180,
                        want_json=False)
        lines, code = done.stdout.strip().splitlines(), done.returncode
    except TimeoutError as e:
        lines, code = e.output.strip().splitlines(), "timeout"
    per_test = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", "\n".join(lines), re.M))
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", ln)),
                   f"stopped by the stage budget after {len(per_test)} test(s)" if code == "timeout" else
                   (lines[-1] if lines else ""))
    failed = [t for t, v in per_test.items() if v in ("FAILED", "ERROR")]
    failed += [ln[6:].strip() for ln in lines if ln.startswith("ERROR ") and ln[6:].strip() not in failed]
    return {"summary": summary, "failed": failed, "exit": code, "tests": per_test}


def _throughput(ctx: Ctx, arch: str, budget: float, *extra: str) -> dict:
    if ctx.dry:
        base = {"sd15": ["--base", "tiny-random"], "sdxl": ["--base", "tiny-sdxl"]}[arch]
        cmd = ["--arch", "base", *base, "--device", "cpu", "--resolution", "64", "--warmup", "1", "--steps", "1"]
    else:
        cmd = ["--arch", arch, "--device", "cuda", "--mixed-precision", "bf16", "--warmup", "3", "--steps", "10"]
    extra = list(extra)
    if ctx.dry:  # batch sizes shrink to 2 at toy size, and the compiler to dynamo alone (no C++ build on the CPU)
        extra = [",".join(sorted({str(min(int(b), 2)) for b in a.split(",")})) if i and extra[i - 1] == "--batch-sizes"
                 else a for i, a in enumerate(extra)]
        if "--compile" in extra:
            extra += ["--compile-backend", "eager"]
    r = ctx.call([ctx.py, "benchmarks/train_throughput.py", *cmd, *extra, "--json"], budget)
    for row in r["rows"]:
        row.update(model=r["model"], arch=arch, resolution=r["resolution"], options=r["options"])
    return r


def stage_train(ctx: Ctx) -> dict:
    return _throughput(ctx, "sd15", 150, "--batch-sizes", "4,16", "--modes", "cached,reencode")


def stage_train_compiled(ctx: Ctx) -> dict:
    rows, notes = [], []
    # One process per batch: a budget cut keeps what was measured. The dry run takes one batch and one mode (the
    # code path is the same), which keeps its test short.
    for b in ("4",) if ctx.dry else ("4", "16"):
        modes = "cached" if ctx.dry else "cached,reencode"
        try:
            rows += _throughput(ctx, "sd15", 200, "--batch-sizes", b, "--modes", modes, "--compile")["rows"]
        except (Skip, TimeoutError, RuntimeError) as e:
            notes.append(f"batch {b}: {e}")
    if not rows:
        raise RuntimeError("; ".join(notes))
    return {"rows": rows, "notes": notes}


def stage_sdxl(ctx: Ctx) -> dict:
    return _throughput(ctx, "sdxl", 120, "--batch-sizes", "4", "--modes", "cached", "--gradient-checkpointing",
                       *(() if ctx.dry else ("--resolution", "1024", "--warmup", "2", "--steps", "5")))


def stage_lowmem(ctx: Ctx) -> dict:
    """Batch 1 with gradient checkpointing (+ 8-bit AdamW where bitsandbytes is installed): the low-memory setting."""
    opts = ["--gradient-checkpointing"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        opts += ["--optimizer", "adamw8bit"]
    rows = []
    for arch in ("sdxl",) if ctx.dry else ("sd15", "sdxl"):  # the dry run: one pass through the same code
        size = () if ctx.dry else ("--resolution", "1024") if arch == "sdxl" else ()
        rows += _throughput(ctx, arch, 90, "--batch-sizes", "1", "--modes", "cached", *opts, *size,
                            *(() if ctx.dry else ("--warmup", "2", "--steps", "4")))["rows"]
    return {"rows": rows, "bitsandbytes": "--optimizer" in opts}


def _blend(ctx: Ctx, budget: float, *extra: str) -> dict:
    if ctx.dry:
        cmd = ["--base", "tiny-random", "--steps", "2", "--repeats", "1", "--threads", "1"]
        if "--compile" in extra:
            cmd += ["--compile-backend", "eager"]
    else:
        cmd = ["--arch", "sd15", "--device", "cuda", "--dtype", "fp16", "--steps", "30", "--repeats", "3"]
    return ctx.call([ctx.py, "benchmarks/blend_latency.py", *cmd, *extra, "--json"], budget)


def stage_blend(ctx: Ctx) -> dict:
    return _blend(ctx, 120)


def stage_blend_compiled(ctx: Ctx) -> dict:
    return _blend(ctx, 200, "--compile", "--repeats", "2")  # the eager cases again (the tool's price), fewer


def stage_peer(ctx: Ctx) -> dict:
    """The peer and `stylelora train` on the same images and base, with the same batch, rank and precision."""
    steps, skip = (3, 1) if ctx.dry else (PEER_STEPS, PEER_SKIP)
    size, batch, rank = (64, 2, 4) if ctx.dry else (512, 4, 16)
    precision = "no" if ctx.dry else "bf16"
    inputs = ctx.work / "peer-inputs"
    ctx.call([ctx.py, __file__, "_inputs", str(inputs), "--size", str(size), "--dry" if ctx.dry else "--real"], 90)
    base, images, prompt = inputs / "base", inputs / "images", "sks style"
    out: dict = {"steps": steps, "timed_steps": steps - skip, "batch": batch, "rank": rank, "resolution": size,
                 "precision": precision,
                 "base": "tiny-random (saved)" if ctx.dry else "SD1.5 architecture, random weights"}
    ours = ["stylelora", "train", str(images), "--base", str(base), "--trigger", prompt, "--resolution", str(size),
            "--batch-size", str(batch), "--rank", str(rank), "--alpha", str(rank), "--lr", "1e-4",
            "--mixed-precision", precision, "--steps", str(steps), "--seed", "0",
            "-o", str(ctx.work / "ours.safetensors")]
    out["ours"] = _timed_run(ctx, ours, steps, skip, 150)
    if not PEER.exists():
        out["peer"] = {"skipped": "no .peer/train_dreambooth_lora.py (see benchmarks/fetch_peer.sh)"}
    elif importlib.util.find_spec("torchvision") is None:
        out["peer"] = {"skipped": "torchvision is not installed (the peer script imports it)"}
    else:
        peer = ["peer", "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(images),
                "--instance_prompt", prompt, "--output_dir", str(ctx.work / "peer-out"), "--resolution", str(size),
                "--train_batch_size", str(batch), "--rank", str(rank), "--learning_rate", "1e-4",
                "--max_train_steps", str(steps), "--mixed_precision", precision, "--seed", "0"]
        out["peer"] = _timed_run(ctx, peer, steps, skip, 200)
    return out


def _timed_run(ctx: Ctx, argv: list[str], steps: int, skip: int, budget: float) -> dict:
    report = ctx.work / f"timed-{argv[0]}.json"
    report.unlink(missing_ok=True)
    try:
        done = ctx.call([ctx.py, __file__, "_timed", str(report), str(steps), str(skip), *argv], budget,
                        want_json=False)
    except (TimeoutError, Skip) as e:
        return {"error": str(e)}
    r = json.loads(report.read_text()) if report.exists() else {}
    if done.returncode != 0:
        r["error"] = f"exit {done.returncode}: {done.stderr.strip()[-600:]}"
    return r


def timed_child(report: str, steps: int, skip: int, argv: list[str]) -> int:
    """Run the peer script or our CLI in this process and time its optimizer steps from the outside.

    A global optimizer-step hook sees every ``torch.optim`` step, ours and the peer's alike, without touching
    either script. The device is synchronized only at step ``skip`` and at the last step, so the time between
    covers exactly ``steps - skip`` steps of device work and adds no host sync inside the loop.
    """
    import runpy

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    cuda = torch.cuda.is_available()
    seen = {"count": 0, "marks": {}}

    def hook(optimizer, args, kwargs):
        seen["count"] += 1
        if seen["count"] in (skip, steps):
            if cuda:
                torch.cuda.synchronize()
            seen["marks"][seen["count"]] = time.perf_counter()
            if seen["count"] == steps and cuda:
                seen["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30

    register_optimizer_step_post_hook(hook)
    t0, rc = time.perf_counter(), 1
    try:
        if argv[0] == "peer":
            sys.argv = [str(PEER), *argv[1:]]
            runpy.run_path(str(PEER), run_name="__main__")
            rc = 0
        else:
            from stylelora.cli import main

            rc = main(argv[1:])
    finally:
        marks, batch = seen["marks"], int(argv[argv.index("--batch-size" if argv[0] != "peer" else
                                                          "--train_batch_size") + 1])
        r = {"optimizer_steps": seen["count"], "wall_s": time.perf_counter() - t0, "batch": batch,
             "peak_mem_gib": seen.get("peak_mem_gib")}
        if skip in marks and steps in marks:
            r["step_ms"] = (marks[steps] - marks[skip]) / (steps - skip) * 1e3
            r["images_per_s"] = batch * 1e3 / r["step_ms"]
        Path(report).write_text(json.dumps(r))
    return rc


def make_inputs(folder: str, size: int, dry: bool) -> int:
    """A diffusers folder of the base (SD1.5 architecture with random weights, or tiny-random in a dry run) and 8
    synthetic images (coloured stripes, no captions: both trainers then use the one prompt)."""
    import numpy as np
    import torch
    from PIL import Image

    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(8):
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        stripes = ((xx + yy + 3 * i) // max(size // 16, 2)) % 2 == 0
        Image.fromarray(np.where(stripes[..., None], fg, bg).astype(np.uint8)).save(images / f"img{i}.png")
    if not (folder / "base" / "model_index.json").exists():
        if dry:
            from stylelora.models import load_base

            pipe = load_base("tiny-random").pipe
        else:
            from stylelora.toy.reference import reference_pipeline

            pipe = reference_pipeline("sd15", dtype=torch.float32, device="cuda")
        pipe.save_pretrained(folder / "base")  # fp32, as a released SD1.5 folder holds it
    print("{}")
    return 0


STAGES = {  # name: (function, what it runs); in priority order
    "facts": (stage_facts, "nvidia-smi --query-gpu=...; torch, CUDA and package versions"),
    "cuda-tests": (stage_cuda_tests, "python -m pytest -q -m gpu tests"),
    "train": (stage_train, "train_throughput.py --arch sd15 --mixed-precision bf16 --batch-sizes 4,16 "
                           "--modes cached,reencode"),
    "peer": (stage_peer, f"diffusers' train_dreambooth_lora.py and `stylelora train`, {PEER_STEPS} steps, batch 4, "
                         "rank 16, bf16, 512 px, same synthetic images and random-weight SD1.5 folder"),
    "blend": (stage_blend, "blend_latency.py --arch sd15 --dtype fp16 --steps 30"),
    "lowmem": (stage_lowmem, "train_throughput.py sd15 512 / sdxl 1024, batch 1, --gradient-checkpointing "
                             "[--optimizer adamw8bit with bitsandbytes]"),
    "sdxl": (stage_sdxl, "train_throughput.py --arch sdxl --resolution 1024 --batch-sizes 4 --gradient-checkpointing"),
    "train-compiled": (stage_train_compiled, "train_throughput.py --arch sd15 --compile, batch 4 and 16"),
    "blend-compiled": (stage_blend_compiled, "blend_latency.py --arch sd15 --dtype fp16 --steps 30 --compile"),
}


def refuse(reason: str, budget: float) -> int:
    plan = "\n".join(f"  {i}. {name}: {what}" for i, (name, (_, what)) in enumerate(STAGES.items(), 1))
    print(f"make bench-gpu needs a CUDA GPU: {reason}.\nIt would have run, within {budget:.0f} s:\n{plan}\n"
          "Without a GPU, `python benchmarks/gpu_suite.py --dry-run` runs every stage at toy sizes on the CPU; "
          "benchmarks/gpu_suite.py's docstring says how to run the real thing on a lent GPU machine.",
          file=sys.stderr)
    return 2


def ensure_packages() -> None:
    """On the device machine: install the carried wheels into a temporary folder and restart with it on the path."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if wheels and not os.environ.get("STYLELORA_BENCH_SITE"):
        site = Path(tempfile.gettempdir()) / "stylelora-bench-site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        env = {**os.environ, "STYLELORA_BENCH_SITE": str(site),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    missing = [m for m in ("torch", *WHEELS, "transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"gpu_suite: python packages missing: {', '.join(missing)}; this machine reaches no registry. Run "
                 "`python benchmarks/gpu_suite.py --prepare` where pip works and carry .whl (see the docstring).")


def prepare() -> int:
    import importlib.metadata as md

    pins = [f"{n}=={md.version(n)}" for n in WHEELS]
    for old in (ROOT / ".whl").glob("*.whl"):  # two versions of one package would stop the install there
        if old.name.split("-")[0] in WHEELS and f"{old.name.split('-')[0]}=={old.name.split('-')[1]}" not in pins:
            old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "-d", str(ROOT / ".whl"), *pins], check=True)
    print(f".whl/: {', '.join(sorted(p.name for p in (ROOT / '.whl').glob('*.whl')))}")
    print(f".peer/: {'present' if PEER.exists() else 'MISSING: see benchmarks/fetch_peer.sh'}")
    print('then: run(command="python3 benchmarks/gpu_suite.py", carry=[".whl", ".peer"], timeout_s=600)')
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks every stage's code path")
    p.add_argument("--prepare", action="store_true", help="download the wheels the device machine lacks into .whl/")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite (default: 540)")
    p.add_argument("--only", help=f"comma-separated stages among: {', '.join(STAGES)}")
    p.add_argument("--out", help="folder for the report (default: docs/benchmarks, or out/bench-dry-run)")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare()
    start = time.monotonic()
    if not args.dry_run:
        if shutil.which("nvidia-smi") is None:
            return refuse("nvidia-smi is not on PATH", args.budget)
        ensure_packages()
        import torch

        if not torch.cuda.is_available():
            return refuse(f"torch {torch.__version__} sees no CUDA device", args.budget)
    names = [s.strip() for s in args.only.split(",")] if args.only else list(STAGES)
    unknown = set(names) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose among {', '.join(STAGES)}")
    out = Path(args.out or (ROOT / ("out/bench-dry-run" if args.dry_run else "docs/benchmarks")))
    logdir = Path(args.out) if args.out else ROOT / "out" / ("bench-dry-run" if args.dry_run else "bench-gpu")
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / "log.txt"
    log.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("STYLELORA_HOME", str(ROOT / ".stylelora-cache"))
    with tempfile.TemporaryDirectory(prefix="stylelora-bench-") as work:
        ctx = Ctx(dry=args.dry_run, deadline=start + args.budget, work=Path(work), log=log, env=env)
        for name in ["facts"] + [n for n in names if n != "facts"]:
            t = time.monotonic()
            try:
                result = {"status": "ok", **STAGES[name][0](ctx)}
            except Skip as e:
                result = {"status": "skipped", "note": str(e)}
            except Exception as e:  # noqa: BLE001 - one broken stage must not lose the others' figures
                result = {"status": "failed" if not isinstance(e, TimeoutError) else "timeout", "note": str(e)}
            result["stage_s"] = round(time.monotonic() - t, 1)
            ctx.results[name] = result
            print(f"[{time.monotonic() - start:5.0f} s] {name}: {result['status']} {result.get('note', '')}",
                  file=sys.stderr, flush=True)
    report, text = write_report(ctx.results, out, dry=args.dry_run, only=names if args.only else None,
                                elapsed=time.monotonic() - start, budget=args.budget)
    if os.environ.get("OUT"):  # the device tool brings back what lands here
        for f in (report, log):
            shutil.copy(f, Path(os.environ["OUT"]) / f.name)
    print(text)
    print(f"\nwritten: {report.relative_to(ROOT) if report.is_relative_to(ROOT) else report}")
    failed = [n for n, r in ctx.results.items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_timed":
        sys.exit(timed_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_inputs":
        sys.exit(make_inputs(sys.argv[2], int(sys.argv[4]), sys.argv[5] == "--dry"))
    sys.exit(main())
