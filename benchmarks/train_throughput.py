"""Training throughput: images/s, step time, peak memory, TFLOP/step and MFU of stylelora's training step.

    python benchmarks/train_throughput.py                                   # tiny base on CPU (checks the script)
    python benchmarks/train_throughput.py --arch sd15 --device cuda --mixed-precision bf16 --batch-sizes 4,16
    python benchmarks/train_throughput.py --arch sdxl --device cuda --resolution 1024 --batch-sizes 1,4 \
        --gradient-checkpointing --optimizer adamw8bit
    python benchmarks/train_throughput.py ... --json
    python benchmarks/train_throughput.py --arch sd15 --device cuda --mixed-precision bf16 --quantize-base nf4

The step timed is the trainer's own (``training.compute_loss`` + backward + optimizer step) on PEFT LoRA layers.
Mode ``cached`` feeds pre-computed latents and text embeddings (what ``stylelora train`` does); mode ``reencode``
runs the VAE and text encoder on every step, as the diffusers example scripts do, so the gain of caching is
measured in the same run. ``--arch`` builds a real architecture with random weights (times like trained ones).
``--quantize-base fp8|int8|nf4`` trains on a quantized frozen base (stylelora/quantize.py). Every run reports the
bytes of the base as stored (exact, per component), the RSS once the base is loaded, and the peak RSS while the
steps run (Linux: the high-water mark is reset after loading, so the fp32 load that fp8 quantizes afterwards does
not count; elsewhere the process's peak); on CUDA each row's peak allocated memory counts the base too.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stylelora import lora, quantize  # noqa: E402
from stylelora.cli import quiet_libraries  # noqa: E402
from stylelora.conditioning import TextConditioning  # noqa: E402
from stylelora.config import DataConfig, NetworkConfig, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from stylelora.models import detect_family, load_base  # noqa: E402
from stylelora.training import DTYPES, compute_loss, make_noise_scheduler, make_optimizer  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}  # dense bf16


class SyntheticSet:
    """Stands in for ``dataset.TrainingSet``: random images/captions, either cached once or re-encoded per step."""

    learnt_tokens = None  # no --train-tokens rows: captions never need a live text encoder here

    def __init__(self, pipe, family, *, batch: int, resolution: int, device, weight_dtype, reencode: bool):
        self.pipe, self.family, self.weight_dtype, self.device = pipe, family, weight_dtype, device
        self.text = TextConditioning(pipe, family)
        self.encoders = [getattr(pipe, n) for n in family.text_encoders]
        self.batch_size, self.res, self.reencode = batch, resolution, reencode
        self.caption = "mystyle, a lighthouse on a cliff at dusk, oil painting"
        g = torch.Generator().manual_seed(0)
        self.pixels = (torch.rand((batch, 3, resolution, resolution), generator=g) * 2 - 1).to(device)
        if not reencode:
            with torch.no_grad():
                self._latents = self._encode_pixels()
                self._cond = self._encode_text()

    def _encode_pixels(self):
        vae = self.pipe.vae
        lat = vae.encode(self.pixels.to(vae.dtype)).latent_dist.sample()
        return (lat * vae.config.scaling_factor).float()

    def _encode_text(self):
        ids = self.text.tokenize([self.caption] * self.batch_size)
        return {k: v for k, v in self.text.encode(self.encoders, ids).items() if v is not None}

    def batch(self, indices, gen):
        with torch.no_grad():
            latents = self._encode_pixels() if self.reencode else self._latents
        n = len(indices)
        size = torch.tensor([[self.res, self.res]] * n, dtype=torch.float32)
        return {"latents": latents[:n], "original_sizes": size, "crops": torch.zeros(n, 2), "target_sizes": size}

    def cached_text(self, indices):
        if self.reencode:
            with torch.no_grad():
                return self._encode_text()
        return self._cond

    def captions(self, indices):
        return [self.caption] * len(indices)


def build(args, dtype):
    q = args.quantize_base
    if args.arch == "base":
        # bitsandbytes quantizes while loading, in the compute dtype (as training.train loads it)
        base = load_base(args.base, quantize=q, **({"dtype": dtype} if q in ("nf4", "int8") else {}))
        return base.pipe, f"{args.base} (loaded)"
    from stylelora.toy.reference import reference_pipeline

    model = f"{args.arch} architecture, random weights"
    if q in ("nf4", "int8"):  # bitsandbytes quantizes in from_pretrained: through a saved copy of the pipeline
        quantize.check_available(q)
        with tempfile.TemporaryDirectory(prefix="stylelora-bench-") as tmp:
            reference_pipeline(args.arch, dtype=dtype, device="cpu").save_pretrained(tmp, safe_serialization=True)
            return load_base(tmp, dtype=dtype, quantize=q).pipe, model
    pipe = reference_pipeline(args.arch, dtype=dtype, device=args.device)
    if q == "fp8":
        quantize.quantize_pipe_fp8(pipe)
    return pipe, model


def rss_gib(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in GiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``5`` to /proc/self/clear_refs, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def base_bytes(pipe) -> dict[str, int]:
    """Bytes of each model component's parameters and buffers as stored (fp8 values and scales, packed 4/8-bit)."""
    return {n: quantize.parameter_bytes(getattr(pipe, n)) for n in ("unet", "text_encoder", "text_encoder_2", "vae")
            if getattr(pipe, n, None) is not None}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args, pipe, batch: int, mode: str) -> dict:
    device = torch.device(args.device)
    weight_dtype = DTYPES[args.mixed_precision]
    family = detect_family(pipe)
    for n in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, n, None)
        if m is not None:
            m.requires_grad_(False)
            quantize.place(m, device, torch.float32 if n == "vae" and args.vae_fp32 else weight_dtype)
    cfg = TrainConfig(data=DataConfig(resolution=args.resolution),
                      network=NetworkConfig(rank=args.rank, train_text_encoder=args.train_text_encoder),
                      optim=OptimConfig(lr=1e-4, optimizer=args.optimizer),
                      run=RunConfig(batch_size=batch, mixed_precision=args.mixed_precision))
    name = f"bench{batch}{mode}"
    lora.inject(pipe.unet, rank=args.rank, alpha=args.rank, targets=cfg.network.unet_targets, adapter_name=name)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family.arch == "sdxl" else [])
    if args.train_text_encoder:
        for enc in encoders:
            lora.inject(enc, rank=args.rank, alpha=args.rank, targets=cfg.network.te_targets, adapter_name=name)
    trained = [pipe.unet] + (encoders if args.train_text_encoder else [])
    for m in trained:
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA weights in fp32, as the trainer keeps them
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, [{"params": params, "lr": 1e-4}], device)
    sched = make_noise_scheduler(pipe, family.prediction_type, False)
    data = SyntheticSet(pipe, family, batch=batch, resolution=args.resolution, device=device,
                        weight_dtype=weight_dtype, reencode=mode == "reencode")
    unet = torch.compile(pipe.unet, backend=args.compile_backend) if args.compile else pipe.unet
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    def step(i):
        gen = torch.Generator().manual_seed(i)
        with autocast:
            loss = compute_loss(data, list(range(batch)), gen, unet, encoders, sched, cfg, family.prediction_type,
                                args.train_text_encoder)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = None
    if not args.compile:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(-1)
        flops = counter.get_total_flops()
    for i in range(args.warmup):
        step(i)
    sync(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync(args.device)
    dt = (time.perf_counter() - t0) / args.steps
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    lora.remove(pipe, name)
    peak_tflops = args.peak_tflops or _peak_tflops(args.device)
    return {
        "mode": mode, "batch": batch, "images_per_s": batch / dt, "step_ms": dt * 1e3, "peak_mem_gib": peak_mem,
        "tflop_per_step": flops / 1e12 if flops else None,
        "mfu": (flops / dt / (peak_tflops * 1e12)) if flops and peak_tflops else None,
    }


def _peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def table(result: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"# {result['model']} | {result['device']} | {result['resolution']}px | rank {result['rank']} | "
             f"{result['mixed_precision']} | options: {result['options'] or 'none'}",
             f"base stored {result['quantize_base'] or 'unquantized'}: "
             + ", ".join(f"{n} {b / 2**20:.2f} MiB ({b} B)" for n, b in result["base_bytes"].items())
             + (f"; RSS loaded {result['rss_loaded_gib']:.2f} GiB" if result["rss_loaded_gib"] else "")
             + f"; peak RSS ({result['peak_rss_scope']}) {result['peak_rss_gib']:.2f} GiB",
             "| mode | batch | images/s | step ms | peak mem GiB | TFLOP/step | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['images_per_s']:.2f} | {r['step_ms']:.1f} | "
                     f"{f(r['peak_mem_gib'], '.2f')} | {f(r['tflop_per_step'], '.3f')} | "
                     f"{f(r['mfu'] and r['mfu'] * 100, '.1f')}{'%' if r['mfu'] else ''} |")
    base = {r["batch"]: r for r in result["rows"] if r["mode"] == "reencode"}
    for r in result["rows"]:
        if r["mode"] == "cached" and r["batch"] in base:
            lines.append(f"caching speed-up at batch {r['batch']}: "
                         f"{r['images_per_s'] / base[r['batch']]['images_per_s']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="base", choices=["base", "sd15", "sdxl"], help="real architecture, random weights")
    p.add_argument("--base", default="tiny", help="base for --arch base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=None, help="default: 128 (base), 512 (sd15), 1024 (sdxl)")
    p.add_argument("--batch-sizes", default="4", help="comma-separated")
    p.add_argument("--modes", default="reencode,cached", help="reencode (VAE+TE every step) and/or cached")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (no FLOP count then)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend; 'eager' traces with dynamo only (a quick CPU check of the path)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--vae-fp32", action="store_true", help="keep the VAE in fp32 in reencode mode")
    p.add_argument("--quantize-base", choices=["fp8", "int8", "nf4"], default=None,
                   help="train on a quantized frozen base: fp8 (CPU and GPU) | int8 | nf4 (bitsandbytes, CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    quiet_libraries()
    args.resolution = args.resolution or {"base": 128, "sd15": 512, "sdxl": 1024}[args.arch]
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipe, model = build(args, DTYPES[args.mixed_precision])
    stored = base_bytes(pipe)
    gc.collect()
    rss_loaded, peak_reset = rss_gib("VmRSS"), reset_peak_rss()
    rows = [measure(args, pipe, int(b), mode) for b in args.batch_sizes.split(",") for mode in args.modes.split(",")]
    opts = [o for o in ("train_text_encoder", "gradient_checkpointing", "channels_last", "compile") if getattr(args, o)]
    if args.optimizer != "adamw":
        opts.append(args.optimizer)
    if args.quantize_base:
        opts.append(f"{args.quantize_base} base")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    result = {"model": model, "device": device, "resolution": args.resolution, "rank": args.rank,
              "mixed_precision": args.mixed_precision, "options": ", ".join(opts), "rows": rows,
              "quantize_base": args.quantize_base, "base_bytes": stored, "rss_loaded_gib": rss_loaded,
              "peak_rss_gib": (rss_gib("VmHWM") if peak_reset else None)
              or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
              "peak_rss_scope": "steps" if peak_reset else "process"}
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
