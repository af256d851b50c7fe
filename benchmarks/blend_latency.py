"""Blend latency: per-image time of the base, the fused blend and PEFT's unfused adapters; re-weighting; loading.

    python benchmarks/blend_latency.py                        # tiny base on CPU
    python benchmarks/blend_latency.py --arch sd15 --device cuda --dtype fp16 --steps 30   # SD1.5-sized, random weights
    python benchmarks/blend_latency.py --arch sd15 --device cuda --dtype fp16 --compile --compile-mode max-autotune

``--arch sd15`` builds the real SD1.5 architecture (UNet 859.5M parameters, CLIP-L text encoder, SD VAE) with
random weights and no download; random weights time exactly like trained ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylelora import blend as blend_mod  # noqa: E402
from stylelora import lora  # noqa: E402
from stylelora.adapter import Adapter, LoraModule  # noqa: E402
from stylelora.blend import Blender  # noqa: E402

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def random_adapter(pipe, name: str, rank: int, seed: int) -> Adapter:
    """Random LoRA on every UNet attention projection and text-encoder attention projection."""
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(name=name, family="sd1", metadata={"ss_sd_model_name": "bench"})
    for comp, module, targets in (("unet", pipe.unet, UNET_TARGETS), ("text_encoder", pipe.text_encoder, TE_TARGETS)):
        mods = {}
        for path, m in module.named_modules():
            if isinstance(m, torch.nn.Linear) and any(path.endswith("." + t) for t in targets):
                mods[path] = LoraModule(torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5,
                                        torch.randn(m.out_features, rank, generator=g) * 0.01, float(rank))
        adapter.modules[comp] = mods
    return adapter


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Fastest of ``repeats`` runs of ``fn()`` after ``warmup`` runs (the minimum is least disturbed by other load)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def restore_time(blender: Blender, device: str, repeats: int) -> float:
    """Fastest ``reset()`` from a 5-adapter blend back to the exact base weights."""
    times = []
    for _ in range(repeats):
        blender.set({n: 0.5 for n in blender.names})
        sync(device)
        t = time.perf_counter()
        blender.reset()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def build(args, dtype):
    from stylelora.models import load_base

    if args.arch == "sd15":
        from diffusers import DPMSolverMultistepScheduler

        from stylelora.toy.reference import reference_pipeline

        pipe = reference_pipeline("sd15", dtype=dtype, device=args.device)
        pipe.vae.to(dtype)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # what users sample with
        return pipe, "sd15 architecture (random weights)"
    return load_base(args.base, dtype=dtype).pipe.to(args.device), args.base


def run(args) -> dict:
    from stylelora.formats import save_adapter

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe, label = build(args, dtype)  # base and fused blend
    peft_pipe, _ = build(args, dtype)  # the same model with unfused PEFT layers
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    folder = Path(tempfile.mkdtemp(prefix="stylelora-bench-"))
    adapters = [random_adapter(pipe, f"a{i}", args.rank, i) for i in range(5)]
    files = [save_adapter(a, folder / f"{a.name}.safetensors", pipe=pipe) for a in adapters]
    rows: dict[str, float] = {}

    blender = Blender(pipe)
    blend_mod._ADAPTERS.clear()
    blend_mod._DIGESTS.clear()
    rows["load adapter (file, first time)"] = timed(lambda: blender.load(files[0]), args.device, 1, warmup=0)
    rows["load adapter (same file again)"] = timed(lambda: Blender(pipe).load(files[0]), args.device, args.repeats)
    for f in files[1:]:
        blender.load(f)
    for a in adapters:
        lora.attach(peft_pipe, a, a.name)
    for comp in ("unet", "text_encoder"):
        getattr(peft_pipe, comp).to(args.device, dtype)

    def image(p):
        p("a lighthouse at dusk", num_inference_steps=args.steps, height=size, width=size,
          generator=torch.Generator("cpu").manual_seed(0), output_type="pil")

    plural = {1: "1 adapter", 3: "3 adapters", 5: "5 adapters"}
    cases = {"base": (pipe, lambda: blender.reset())}
    for n in (1, 3, 5):
        cases[f"fused blend, {plural[n]}"] = (pipe, lambda n=n: blender.set({f"a{i}": 0.5 for i in range(n)}))
    for n in (1, 3, 5):
        cases[f"PEFT unfused set_adapters, {plural[n]}"] = (
            peft_pipe, lambda n=n: peft_pipe.set_adapters([f"a{i}" for i in range(n)], adapter_weights=[0.5] * n))
    for p in (pipe, peft_pipe):
        p.set_progress_bar_config(disable=True)
        image(p)  # warm-up
    # Rounds visit every case in turn, so a burst of outside load hits all cases alike.
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, (p, prepare) in cases.items():
            prepare()
            times[name].append(timed(lambda p=p: image(p), args.device, 1, warmup=0))
    rows = {**{k: min(v) for k, v in times.items()}, **rows}

    flip = iter(range(10**6))
    rows["change weights (5 adapters, all)"] = timed(
        lambda: blender.set({f"a{i}": 0.1 + 0.01 * (next(flip) % 7) for i in range(5)}), args.device, args.repeats)
    rows["change weight (1 of 5)"] = timed(lambda: blender.update({"a2": 0.2 + 0.01 * (next(flip) % 7)}),
                                           args.device, args.repeats)
    rows["restore base (5 active -> all 0)"] = restore_time(blender, args.device, args.repeats)
    extra = compiled_rows(args, pipe, blender, image) if args.compile else {}
    rows.update(extra.pop("seconds", {}))
    return {**extra, "base": label, "device": args.device, "dtype": args.dtype, "size": size, "steps": args.steps,
            "rank": args.rank, "repeats": args.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "seconds": {k: round(v, 6) for k, v in rows.items()}}


def compiled_rows(args, pipe, blender, image) -> dict:
    """Latency with a torch.compile'd UNet, and how many graphs weight changes add (should be none).

    The Blender writes fused weights in place (``weight.copy_``), so compiled graphs see the same parameters and
    stay valid: a weight change must cost no recompilation.
    """
    from torch._dynamo.utils import counters

    # a mode is an inductor option; other backends ('eager': dynamo tracing alone, a quick CPU check) take none
    inductor = args.compile_backend == "inductor"
    pipe.unet = torch.compile(pipe.unet, backend=args.compile_backend, mode=args.compile_mode if inductor else None)
    blender.reset()
    image(pipe)  # compile
    image(pipe)
    graphs = counters["stats"]["unique_graphs"]
    out = {"base (compiled)": timed(lambda: image(pipe), args.device, args.repeats, warmup=0)}
    for n in (3, 5):
        blender.set({f"a{i}": 0.5 for i in range(n)})
        image(pipe)
        out[f"fused blend, {n} adapters (compiled)"] = timed(lambda: image(pipe), args.device, args.repeats, warmup=0)
    for w in (0.1, 0.7, -0.3):
        blender.set({"a0": w, "a3": 0.2})
        image(pipe)
    return {"seconds": out, "compile_mode": args.compile_mode,
            "recompilations_after_weight_changes": counters["stats"]["unique_graphs"] - graphs}


def table(result: dict) -> str:
    s = result["seconds"]
    base = s["base"]
    head = (f"stylelora blend latency: {result['base']}, {result['device']} {result['dtype']}, "
            f"{result['size']}x{result['size']}, {result['steps']} steps, adapter rank {result['rank']}, "
            f"best of {result['repeats']}, torch {result['torch']}, {result['threads']} thread(s)")
    lines = [head, "", f"{'per image':<40}{'ms':>10}{'vs base':>10}"]
    order = ["base"] + [k for k in s if k.startswith("fused") and "compiled" not in k] + \
        [k for k in s if k.startswith("PEFT")] + [k for k in s if "compiled" in k]
    for k in order:
        lines.append(f"{k:<40}{1000 * s[k]:>10.1f}{s[k] / base:>9.2f}x")
    lines += ["", f"{'operation':<40}{'ms':>10}"]
    for k in s:
        if k not in order:
            lines.append(f"{k:<40}{1000 * s[k]:>10.2f}")
    if "recompilations_after_weight_changes" in result:
        lines += ["", f"torch.compile mode {result['compile_mode']}: "
                  f"{result['recompilations_after_weight_changes']} recompilation(s) after 4 weight changes"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="tiny", help="base model for --arch base (default: tiny)")
    p.add_argument("--arch", default="base", choices=["base", "sd15"], help="sd15: SD1.5 architecture, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 gives steadier numbers on a busy machine)")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd UNet and count recompilations")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune (CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend; 'eager' traces with dynamo only (a quick CPU check of the path)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from stylelora.cli import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore", message=".*peft_config.*")  # several adapters on one model is the point here
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
