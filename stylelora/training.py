"""Train a LoRA style adapter: ``train(TrainConfig) -> Path``.

The loop reads top to bottom: set up → data and caches → LoRA layers → optimizer → steps → adapter file.
Every random draw of step ``s`` (noise, timesteps, flips, latent samples, LoRA dropout) comes from a generator
seeded by (seed, s, process), so a run resumed from a checkpoint ends exactly where an uninterrupted one ends.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import adalora, checkpoint, data, lora, quantize, tokens
from .samples import thumbnail_index, write_samples
from .config import TrainConfig
from .dataset import TrainingSet
from .errors import ConfigError, TrainingCancelled, TrainingError
from .models import TINY, Base, ensure_tiny, load_base, stylelora_home

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def step_seed(seed: int, step: int, rank: int) -> int:
    """Independent, reproducible stream per (seed, step, process)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


ADAPTER_NAME = "stylelora_train"


@dataclass(frozen=True)
class StepInfo:
    """What ``train(on_step=...)`` is given after every optimizer step (on every process).

    Building it costs no host sync: ``loss`` stays a device tensor (calling ``.item()`` on it is the callback's
    choice, and costs a sync), ``lrs`` and ``indices`` are plain Python values the loop already has.
    """

    step: int                      # optimizer steps done, 1..steps
    steps: int                     # the run's total steps
    rank: int                      # this process's index
    world: int                     # number of processes
    indices: list[list[int]]       # training-set item indices of each micro-batch this process used in the step
    loss: torch.Tensor             # the step's loss (mean over its micro-batches), detached, on the device
    lrs: list[float]               # learning rate of each optimizer param group (UNet first) used by this step
    models: dict[str, Any]         # the modules with LoRA layers ("unet", "text_encoder"...), unwrapped from DDP


def train(config: TrainConfig, *, base: Base | None = None, progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, on_step: Callable[[StepInfo], None] | None = None,
          on_data: Callable[[data.DatasetSummary], None] | None = None) -> Path:
    """Train an adapter as ``config`` says; returns the path of the written adapter file.

    ``base``: an already loaded base (e.g. the web UI's) to train on instead of loading ``config.run.base``; its
    weights, dtypes and devices are left as they were found, the LoRA layers removed again.
    ``progress``: called with ``{"step", "steps", "loss", "lr", "elapsed", "eta", "sample"}`` at every log point
    and when sample images are written. ``should_stop``: polled every step; when it returns True the run writes a
    checkpoint and raises ``TrainingCancelled`` (resume it later with ``resume="latest"``).
    ``on_step``: called with a ``StepInfo`` at the end of every optimizer step, after that step's logging and
    checkpoint (on every process; see ``StepInfo``). Exceptions it raises end the run.
    ``on_data``: called once with the ``data.DatasetSummary`` of the scanned images, before the base is loaded.
    """
    from accelerate import Accelerator

    cfg, run = config, config.run
    if not cfg.data.folder:
        raise ConfigError("no image folder given (the first argument of `stylelora train`, or [data] folder)")
    output = Path(run.output).expanduser().resolve()
    if output.suffix != ".safetensors":
        raise ConfigError(f"output {output} must end in .safetensors")
    started_at = time.time()
    if cfg.network.train_tokens:
        tokens.check_trigger(cfg.data.trigger, cfg.network.train_tokens)
    quantize.check_available(run.quantize_base)  # nf4/int8 without CUDA/bitsandbytes: before anything is loaded
    if base is not None and quantize.quantization(base.pipe) != run.quantize_base:
        stored = quantize.quantization(base.pipe)
        if run.quantize_base is not None:
            raise ConfigError(f"quantize_base is {run.quantize_base} but the given base is stored "
                              f"{stored or 'in full precision'}: load the base with --quantize-base "
                              f"{run.quantize_base} (load_base(..., quantize=...)), or leave quantize_base out")
        cfg = cfg.replace(quantize_base=stored)  # a quantized base lent by the caller (web UI): recorded
        run = cfg.run
    if base is None and run.base in TINY:
        ensure_tiny(run.base)  # before the process group exists (see ensure_tiny)

    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
        log_with="tensorboard" if run.tensorboard_dir else None,
        project_dir=run.tensorboard_dir,
    )
    if accelerator.device.type == "cuda":
        # TF32 for the fp32 matmuls (LoRA weights, fp32 runs): ~free speed on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data first: bad input fails before a model is loaded or anything is written
    items = data.scan_folder(cfg.data.folder, trigger=cfg.data.trigger, caption_template=cfg.data.caption_template,
                             repeats=cfg.data.repeats, default_repeats=cfg.data.default_repeats,
                             skip_bad_images=cfg.data.skip_bad_images, report=(report := {}))
    if cfg.data.reg_folder:
        from .toy.world import resolve_reg_folder  # "toy:plain": the tiny-scaled recipes' built-in set

        with accelerator.main_process_first():  # the built-in set is written once, by the first process
            reg_folder = resolve_reg_folder(cfg.data.reg_folder)
        items += regularization_items(reg_folder, skip_bad_images=cfg.data.skip_bad_images, report=report)
    if on_data is not None and accelerator.is_main_process:
        on_data(data.summarize(items, resolution=cfg.data.resolution, bucket_step=cfg.data.bucket_step,
                               upscale=cfg.data.upscale, **report))

    # ---- base model: a caller's base is given back as it was found, whatever happens in the run
    borrowed = base is not None
    # bitsandbytes quantizes while loading, in the compute dtype; fp8 is stored after an fp32 load (like no quantization)
    base = base or load_base(run.base, base_config=run.base_config, quantize=run.quantize_base,
                             **({"dtype": DTYPES[run.mixed_precision]} if run.quantize_base in ("nf4", "int8") else {}))
    parts = ["unet", "vae", *base.family.text_encoders]
    original = {n: (getattr(base.pipe, n).device, getattr(base.pipe, n).dtype) for n in parts}
    scheduler = base.pipe.scheduler
    learnt = tokens.TriggerTokens()  # filled by _setup with --train-tokens; given back below
    try:
        return _train_on(base, cfg, accelerator, items, output, started_at,
                         hooks=_Hooks(progress=progress, should_stop=should_stop, on_step=on_step), learnt=learnt)
    finally:
        if borrowed:
            lora.remove(base.pipe, ADAPTER_NAME)
            learnt.remove(base.pipe)
            for n, (dev, dtype) in original.items():
                quantize.place(getattr(base.pipe, n), dev, dtype)
            base.pipe.scheduler = scheduler


def regularization_items(folder: str, *, skip_bad_images: bool = False, report: dict | None = None
                         ) -> list[data.ImageItem]:
    """Prior-preservation images: captions exactly as written (no trigger added; uncaptioned ones train the empty
    prompt), folder repeats as usual, and their own ``reg/...`` subset in the adapter's metadata."""
    items = data.scan_folder(folder, trigger=None, caption_template="", skip_bad_images=skip_bad_images,
                             report=report)
    name = Path(folder).expanduser().absolute().name
    return [dataclasses.replace(it, subset=f"reg/{name if it.subset in ('', '.') else it.subset}") for it in items]


@dataclass
class _Hooks:
    progress: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_step: Callable[[StepInfo], None] | None = None


@dataclass
class _Parts:
    """What a step needs, built once by the setup helpers."""

    tset: TrainingSet
    noise_scheduler: Any
    prediction_type: str
    trained: dict[str, Any]      # prepared (DDP-wrapped when multi-process) modules with LoRA layers
    unet: Any                    # the prepared UNet: its state is what is saved
    unet_forward: Any            # what the step calls: `unet`, or its torch.compile'd forward
    encoders: list               # text encoders (prepared when trained)
    params: list                 # all LoRA parameters (for gradient clipping)
    optimizer: Any
    lr_scheduler: Any
    learnt: tokens.TriggerTokens  # learnt trigger tokens (inactive without --train-tokens)
    token_stop: int = 0           # the first step (0-based) in which the learnt tokens no longer change
    adalora: adalora.AdaLora | None = None  # --network adalora: its allocator, regulariser and export


@dataclass
class _Meter:
    """Loss and NaN/inf flags summed on the device; read (one host sync) only at log points."""

    bad: torch.Tensor
    loss_sum: torch.Tensor
    last_good: Path | None       # newest checkpoint, named in the NaN error
    loop_start: float = 0.0


class EpochStream:
    """Micro-batch ``m`` of the endless stream of epochs; epoch ``e`` is shuffled by ``(seed, e)``."""

    def __init__(self, buckets, repeats: list[int], batch_size: int, seed: int):
        self.args, self.plans = (buckets, repeats, batch_size, seed), {}
        self.per_epoch = len(self._plan(0))

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self.plans:
            self.plans[epoch] = data.batch_plan(*self.args, epoch)
        return self.plans[epoch]

    def __call__(self, m: int) -> list[int]:
        epoch, k = divmod(m, self.per_epoch)
        return self._plan(epoch)[k]


def _train_on(base: Base, cfg: TrainConfig, accelerator, items, output: Path, started_at: float, hooks: _Hooks,
              learnt: tokens.TriggerTokens) -> Path:
    """The run proper, on a loaded base: frozen base → caches → LoRA → optimizer → resume → steps → adapter file."""
    from tqdm.auto import tqdm

    run = cfg.run
    p = _setup(base, cfg, accelerator, items, learnt)
    ckpt_root = checkpoint.checkpoint_root(output)
    run_state = {"config": cfg.to_dict(), "data": p.tset.fingerprint(), "world": accelerator.num_processes}
    start_step = _resume(run.resume, ckpt_root, run_state, accelerator, p)
    stream = EpochStream(p.tset.buckets, [it.repeats for it in items], run.batch_size, run.seed)

    saved = checkpoint.list_checkpoints(ckpt_root)
    meter = _Meter(bad=torch.zeros((), dtype=torch.bool, device=accelerator.device),
                   loss_sum=torch.zeros((), device=accelerator.device), last_good=saved[-1] if saved else None)
    if accelerator.is_main_process and run.tensorboard_dir:
        accelerator.init_trackers("stylelora")
    meter.loop_start = time.time()
    bar = tqdm(range(start_step, run.steps), initial=start_step, total=run.steps, desc="train",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    p.unet.train()
    for enc in p.encoders:
        enc.train(cfg.network.train_text_encoder)
    unwrapped = {n: accelerator.unwrap_model(m) for n, m in p.trained.items()} if hooks.on_step else {}
    for step in bar:
        indices, loss, lrs = _step(p, cfg, accelerator, stream, step)
        meter.bad |= ~torch.isfinite(loss)
        meter.loss_sum += loss
        done = step + 1
        stop = _stop_requested(hooks, accelerator) and done < run.steps
        is_ckpt = stop or (run.checkpoint_every and done % run.checkpoint_every == 0 and done < run.steps)
        if done % run.log_every == 0 or is_ckpt or done == run.steps:
            _log(meter, done, start_step, run, accelerator, p.lr_scheduler, bar, hooks.progress)
        if run.sample_every and done % run.sample_every == 0 and done < run.steps and accelerator.is_main_process:
            paths = write_samples(base.pipe, cfg, output, done, accelerator, return_paths=True)
            if hooks.progress and paths:
                hooks.progress({"step": done, "steps": run.steps, "sample": paths})
        if is_ckpt:
            meter.last_good = (_save_checkpoint(ckpt_root, done, run_state, accelerator, p, run.keep_checkpoints)
                               or meter.last_good)
        _save_every(base, cfg, items, output, done, started_at, accelerator, p, stream)
        if hooks.on_step:
            hooks.on_step(StepInfo(step=done, steps=run.steps, rank=accelerator.process_index,
                                   world=accelerator.num_processes, indices=indices, loss=loss, lrs=lrs,
                                   models=unwrapped))
        if stop:
            bar.close()
            raise TrainingCancelled(f"training stopped at step {done}; checkpoint {meter.last_good}. "
                                    "Resume with --resume latest (same settings).")
    bar.close()
    _write_adapter(base, cfg, items, output, started_at, accelerator, p, stream, ckpt_root, run_state)
    return output


def _stop_requested(hooks: _Hooks, accelerator) -> bool:
    """Whether to stop after this step. With several processes a stop seen by any one (a signal, the UI) stops all
    of them at the same step: each must reach the checkpoint's barrier, or the others wait there forever. That
    costs one tiny all-reduce per step, and only when a ``should_stop`` was given."""
    if hooks.should_stop is None:
        return False
    asked = bool(hooks.should_stop())
    if accelerator.num_processes == 1:
        return asked
    if asked:
        accelerator.set_trigger()
    return accelerator.check_trigger()


def _setup(base: Base, cfg: TrainConfig, accelerator, items, learnt: tokens.TriggerTokens) -> _Parts:
    """Frozen base in the training dtype, filled caches, seeded LoRA layers, optimizer and LR schedule, prepared."""
    from diffusers.optimization import get_scheduler

    run, pipe, family = cfg.run, base.pipe, base.family
    weight_dtype = DTYPES[run.mixed_precision]
    te_names = list(family.text_encoders)
    train_te = cfg.network.train_text_encoder
    prediction_type = run.prediction_type or family.prediction_type
    _freeze(pipe, te_names, accelerator.device, weight_dtype)
    noise_scheduler = make_noise_scheduler(pipe, prediction_type, cfg.optim.zero_terminal_snr)
    if cfg.network.train_tokens:  # the tokenizers first: the text cache must know which captions use the tokens
        learnt.add_tokens(pipe, te_names, cfg.data.trigger, cfg.network.train_tokens,
                          standins=tokens.STANDIN_TOKENS if cfg.network.blend_ready else 0)

    # caches (main process fills them; the others then read them back)
    tset = TrainingSet(items, cfg.data, pipe, cache_root=Path(cfg.data.cache_dir or stylelora_home() / "cache"),
                       cache_text=not train_te, device=accelerator.device, weight_dtype=weight_dtype, family=family,
                       learnt_tokens=learnt)
    with accelerator.main_process_first():
        tset.prepare()
    log.info("cache: latents %s, text %s", tset.latent_cache.stats, tset.text_cache.stats)
    if tset.cache_latents:
        pipe.vae.to("cpu")  # not needed in the step any more

    trained, ada = _inject_lora(pipe, cfg, te_names)
    groups = [{"params": lora.trainable_parameters(getattr(pipe, n)),
               "lr": cfg.optim.lr if n == "unet" else (cfg.optim.te_lr if cfg.optim.te_lr is not None else cfg.optim.lr)}
              for n in trained]
    groups = [g for g in groups if g["params"]]
    if learnt.active:
        # after the LoRA groups (their order and lrs stay those of a run without tokens); the rows come after the
        # LoRA injection so they are in no LoRA group, and are seeded apart from the LoRA initialisation
        groups.append({"params": learnt.add_rows(pipe, cfg.network.token_init, run.seed), "lr": cfg.optim.token_lr})
        # the text encoders now train even without their LoRA: they go through prepare() (DDP syncs the rows)
        trained += [n for n in te_names if n not in trained]
    optimizer = make_optimizer(cfg, groups, accelerator.device)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=run.steps)
    # only modules with trainable parameters go through prepare() (DDP refuses a module with nothing to train)
    models = {n: accelerator.prepare(getattr(pipe, n)) if n in trained else getattr(pipe, n)
              for n in ["unet", *te_names]}
    # the compiled forward is used in the step; `unet` stays the module whose state is saved
    unet_forward = torch.compile(models["unet"]) if run.compile else models["unet"]
    optimizer = accelerator.prepare(optimizer)
    return _Parts(tset=tset, noise_scheduler=noise_scheduler, prediction_type=prediction_type,
                  trained={n: models[n] for n in trained}, unet=models["unet"], unet_forward=unet_forward,
                  encoders=[models[n] for n in te_names], params=[q for g in groups for q in g["params"]],
                  optimizer=optimizer, lr_scheduler=lr_scheduler, learnt=learnt,
                  token_stop=tokens.stop_step(run.steps, cfg.optim.token_stop), adalora=ada)


def _freeze(pipe, te_names: list[str], device, weight_dtype) -> None:
    """Base frozen; UNet/text encoders in the training dtype, VAE in fp32 (fp16 VAEs overflow to NaN)."""
    for n in ["unet", "vae", *te_names]:
        getattr(pipe, n).requires_grad_(False)
    for n in ["unet", *te_names]:
        quantize.place(getattr(pipe, n), device, weight_dtype)  # fp8 storage stays fp8: weight_dtype computes
    pipe.vae.to(device, torch.float32)


def _inject_lora(pipe, cfg: TrainConfig, te_names: list[str]) -> tuple[list[str], adalora.AdaLora | None]:
    """PEFT LoRA (or AdaLoRA) layers, initialised from ``run.seed``; trainable weights in fp32 whatever the base
    dtype. Returns the names of the components that got layers, and the AdaLoRA driver (None for plain LoRA)."""
    from diffusers.training_utils import cast_training_params

    net, run = cfg.network, cfg.run
    train_te = net.train_text_encoder
    torch.manual_seed(run.seed)
    trained = (["unet"] if net.unet_targets else []) + (te_names if train_te else [])
    ada = adalora.AdaLora(pipe, cfg, trained, ADAPTER_NAME) if net.network == "adalora" else None
    for n in trained if ada is None else []:
        # locon: the UNet's ResNet and down/upsampler layers too, kohya's LoCon set (lora.locon_targets)
        sized = lora.locon_targets(pipe.unet, rank=net.rank, alpha=net.lora_alpha, conv_rank=net.conv_lora_rank,
                                   conv_alpha=net.conv_lora_alpha) if n == "unet" and net.network == "locon" else None
        lora.inject(getattr(pipe, n), rank=net.rank, alpha=net.lora_alpha, dropout=net.dropout,
                    targets=net.unet_targets if n == "unet" else net.te_targets, adapter_name=ADAPTER_NAME,
                    dora=net.dora_layout if net.network == "dora" else None, sized=sized)
    cast_training_params([getattr(pipe, n) for n in trained], dtype=torch.float32)
    if net.slot is not None:  # orthogonal slots: A frozen to the slot's basis rows (recomputed on resume)
        from . import orthogonal

        for n in trained:
            orthogonal.freeze_slot(getattr(pipe, n), n, ADAPTER_NAME, rank=net.rank, slot=net.slot)
    if run.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if run.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for n in te_names if train_te else []:
            getattr(pipe, n).gradient_checkpointing_enable()
    return trained, ada


def _resume(resume: str | None, ckpt_root: Path, run_state: dict, accelerator, p: _Parts) -> int:
    """The step to start from: 0, or the step of the checkpoint ``resume`` names (loaded into the live run)."""
    if not resume:
        return 0
    found = checkpoint.find(resume, ckpt_root)
    if found is None:
        accelerator.print(f"--resume {resume}: no checkpoint in {ckpt_root}, starting from step 0")
        return 0
    step = checkpoint.restore(found, run_state, accelerator, p.trained, p.optimizer, p.lr_scheduler)
    if p.adalora is not None:
        p.adalora.load_checkpoint(found)
    accelerator.print(f"resumed from {found} at step {step}")
    return step


def _step(p: _Parts, cfg: TrainConfig, accelerator, stream: EpochStream, step: int):
    """One optimizer step over ``grad_accum`` micro-batches; returns (micro-batch indices, loss tensor, lrs used).

    No host sync: the loss stays on the device.
    """
    run = cfg.run
    rank, world = accelerator.process_index, accelerator.num_processes
    gen = torch.Generator().manual_seed(step_seed(run.seed, step, rank))
    torch.manual_seed(step_seed(run.seed, step, rank))  # LoRA dropout draws from the global generator
    seen, total = [], torch.zeros((), device=accelerator.device)
    for a in range(run.grad_accum):
        indices = stream((step * run.grad_accum + a) * world + rank)
        seen.append(indices)
        # gradients are all-reduced only on the last micro-batch of the step
        with accelerator.no_sync(p.unet) if a < run.grad_accum - 1 else nullcontext():
            with accelerator.autocast():
                loss = compute_loss(p.tset, indices, gen, p.unet_forward, p.encoders, p.noise_scheduler, cfg,
                                    p.prediction_type, cfg.network.train_text_encoder,
                                    # several processes: each runs the text encoders in every micro-batch, as
                                    # DDP all-reduces the learnt rows' gradients in each backward
                                    p.learnt.active and world > 1)
            if p.adalora is not None:  # AdaLoRA's orthogonal regulariser (a UNet output has no .loss for PEFT)
                loss = loss + p.adalora.regulariser()
            accelerator.backward(loss / run.grad_accum)
        total += loss.detach().float() / run.grad_accum
    if p.learnt.active and step >= p.token_stop:
        for rows in p.learnt.rows.values():
            rows.grad = None  # the tokens stop training (--token-stop): the optimizer skips a parameter without grad
    if cfg.optim.max_grad_norm > 0:
        accelerator.clip_grad_norm_(p.params, cfg.optim.max_grad_norm)
    lrs = [g["lr"] for g in p.optimizer.param_groups]
    p.optimizer.step()
    p.lr_scheduler.step()
    if p.adalora is not None:  # AdaLoRA's rank allocation reads the gradients: before zero_grad
        p.adalora.after_step(step + 1)
    p.optimizer.zero_grad(set_to_none=True)
    return seen, total, lrs


def _log(meter: _Meter, done: int, start_step: int, run, accelerator, lr_scheduler, bar, progress) -> None:
    """A log point: stop on NaN/inf (the loop's only host sync), then report the mean loss since the last one."""
    if bool(accelerator.reduce(meter.bad.float(), reduction="sum") > 0):
        last_good = meter.last_good
        raise TrainingError(
            f"the loss became NaN/inf before step {done}; stopping. "
            + (f"The last good checkpoint is {last_good} (resume with --resume {last_good} and a lower "
               "--lr, or --mixed-precision bf16/no)." if last_good else
               "No checkpoint was written yet. Try a lower --lr, --mixed-precision bf16 or no, or "
               "--checkpoint-every N.")
        )
    avg = meter.loss_sum.item() / ((done - 1) % run.log_every + 1)
    meter.loss_sum.zero_()
    lr = lr_scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.2e}")
    if progress and accelerator.is_main_process:
        elapsed = time.time() - meter.loop_start
        rate = (done - start_step) / elapsed if elapsed > 0 else 0.0
        progress({"step": done, "steps": run.steps, "loss": avg, "lr": lr, "elapsed": elapsed,
                  "eta": (run.steps - done) / rate if rate else None, "sample": None})
    if run.tensorboard_dir:
        accelerator.log({"loss": avg, "lr": lr}, step=done)


def _save_checkpoint(ckpt_root: Path, step: int, run_state: dict, accelerator, p: _Parts, keep: int) -> Path | None:
    """Written by the main process while the others wait; returns its folder (None on the other processes)."""
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        path = checkpoint.save(ckpt_root, step, params=checkpoint.trainable_state(accelerator, p.trained),
                               optimizer=p.optimizer, lr_scheduler=p.lr_scheduler, scaler=accelerator.scaler,
                               state=run_state, keep=keep, extra=_extra_state(p))
    accelerator.wait_for_everyone()
    return path


def intermediate_path(output: Path, step: int) -> Path:
    """Where ``--save-every`` writes the adapter of step ``step``: beside the output, ``NAME-step-N.safetensors``."""
    return output.parent / f"{output.stem}-step-{step}{output.suffix}"


def _save_every(base: Base, cfg: TrainConfig, items, output: Path, done: int, started_at: float, accelerator,
                p: _Parts, stream: EpochStream) -> None:
    """``--save-every N``: a loadable adapter of the current state every N steps (not at the last step: that one
    is the output itself), written like the final adapter. The other processes wait, as for a checkpoint."""
    every = cfg.run.save_every
    if not every or done % every or done >= cfg.run.steps:
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = intermediate_path(output, done)
        _save_adapter(base, cfg, items, path, done, started_at, accelerator, p, stream, samples=[])
        accelerator.print(f"step {done}: wrote {path}")
    accelerator.wait_for_everyone()


def _save_adapter(base: Base, cfg: TrainConfig, items, path: Path, step: int, started_at: float, accelerator,
                  p: _Parts, stream: EpochStream, samples: list) -> None:
    """The adapter file of the live LoRA state (and learnt tokens) at ``step``, with its metadata (main process)."""
    from . import formats

    run = cfg.run
    adapter = p.adalora.extract(base.pipe) if p.adalora else lora.extract(base.pipe, ADAPTER_NAME)
    adapter.name = path.stem
    adapter.family = base.family.key
    if p.learnt.active:
        adapter.embeddings[p.learnt.word] = p.learnt.embedding()
    epoch = math.ceil(step * run.grad_accum * accelerator.num_processes / stream.per_epoch)
    meta = formats.training_metadata(cfg, base.family, items=items, base_name=base.name, steps=step,
                                     epoch=epoch, started_at=started_at, finished_at=time.time(),
                                     thumbnail=samples[thumbnail_index(cfg)] if samples else None)
    if p.adalora is not None:
        meta.update(p.adalora.metadata(adapter))
    formats.save_adapter(adapter, path, format=run.format, family=base.family, metadata=meta, pipe=base.pipe)


def _extra_state(p: _Parts) -> dict | None:
    """State beyond parameters/optimizer that a bit-exact resume needs (AdaLoRA's allocator)."""
    return {adalora.STATE_KEY: p.adalora.state_dict()} if p.adalora is not None else None


def _write_adapter(base: Base, cfg: TrainConfig, items, output: Path, started_at: float, accelerator, p: _Parts,
                   stream: EpochStream, ckpt_root: Path, run_state: dict) -> None:
    """Final samples, the adapter file with its metadata, and a last checkpoint (main process)."""
    run = cfg.run
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        samples = write_samples(base.pipe, cfg, output, run.steps, accelerator)
        _save_adapter(base, cfg, items, output, run.steps, started_at, accelerator, p, stream, samples)
        # the final state is also a checkpoint, so a later `--steps N --resume latest` can continue training
        checkpoint.save(ckpt_root, run.steps, params=checkpoint.trainable_state(accelerator, p.trained),
                        optimizer=p.optimizer, lr_scheduler=p.lr_scheduler, scaler=accelerator.scaler,
                        state=run_state, keep=run.keep_checkpoints, extra=_extra_state(p))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def compute_loss(tset, indices, gen, unet, encoders, noise_scheduler, cfg, prediction_type, train_te,
                 live_text: bool = False):
    """Diffusion loss for one micro-batch: noise the latents at random timesteps, predict, weight by min-SNR."""
    from diffusers.training_utils import compute_snr

    from .conditioning import unet_kwargs

    batch = tset.batch(indices, gen)
    latents = batch["latents"]
    noise = torch.randn(latents.shape, generator=gen)
    if cfg.optim.noise_offset:
        noise += cfg.optim.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)
    noise = noise.to(latents.device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    t = t.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    # caption dropout: drawn only when on, so runs without it keep their random streams
    drop = {}
    if cfg.data.caption_dropout:
        drop["drop"] = (torch.rand(len(indices), generator=gen) < cfg.data.caption_dropout).tolist()
    captions = None
    if cfg.network.blend_ready and tset.learnt_tokens is not None:  # drawn only when on, as caption dropout
        tset.learnt_tokens.redraw_standins(gen)
        captions = tset.learnt_tokens.with_standin(tset.captions(indices, **drop), cfg.network.blend_ready, gen)
    if train_te:
        cond = tset.text.encode(encoders, tset.text.tokenize(captions or tset.captions(indices, **drop)))
    else:
        # cached, except captions with learnt tokens or a stand-in (encoded live: their rows train), or all with
        # live_text
        live = {"encoders": encoders, "live_all": live_text} if tset.learnt_tokens is not None else {}
        rewritten = {"captions": captions} if captions is not None else {}  # only --blend-ready rewrites them
        cond = tset.cached_text(indices, **drop, **live, **rewritten)
    dtype = tset.weight_dtype
    extra = unet_kwargs(tset.family, cond, original_sizes=batch["original_sizes"], crops=batch["crops"],
                        target_sizes=batch["target_sizes"], dtype=dtype)
    pred = unet(noisy.to(dtype), t, cond["hidden"].to(dtype), **extra).sample.float()
    target = loss_target(noise_scheduler, prediction_type, latents, noise, t)
    loss = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
    gamma = cfg.optim.min_snr_gamma
    if gamma:
        snr = compute_snr(noise_scheduler, t)
        # min-SNR-gamma (Hang et al. 2023); for v-prediction the weight is divided by snr + 1 instead of snr
        w = torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        loss = loss * w
    return loss.mean()


def loss_target(noise_scheduler, prediction_type: str, latents, noise, t):
    """What the UNet should predict: the noise (epsilon) or the velocity v = α_t·ε − σ_t·x₀."""
    if prediction_type == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, t)


def make_noise_scheduler(pipe, prediction_type: str, zero_terminal_snr: bool):
    """DDPM training schedule from the base's scheduler config; optionally rescaled to zero terminal SNR.

    Zero terminal SNR (Lin et al. 2023) lets the model learn pure-noise inputs (true blacks/whites); the sampling
    scheduler is switched to the same betas and "trailing" spacing so inference matches training.
    """
    from diffusers import DDPMScheduler

    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ConfigError("zero_terminal_snr needs v-prediction (epsilon is undefined at zero SNR): add "
                          "--prediction-type v_prediction, or drop --zero-terminal-snr")
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    if prediction_type != getattr(pipe.scheduler.config, "prediction_type", None) or extra:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type,
                                                          **extra)
    return DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type, **extra)


def make_optimizer(cfg: TrainConfig, groups: list[dict], device: torch.device):
    o = cfg.optim
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes (CUDA only)") from None
        return bnb.optim.AdamW8bit(groups, weight_decay=o.weight_decay)
    # fused AdamW: one kernel for all LoRA tensors on CUDA (no per-parameter launches)
    return torch.optim.AdamW(groups, weight_decay=o.weight_decay, fused=device.type == "cuda")
