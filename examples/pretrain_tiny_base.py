"""Pretrain stylelora's built-in ``tiny`` base on the procedural toy world (stylelora/toy/world.py), from scratch.

    python examples/pretrain_tiny_base.py --seed 0      # CPU (about an hour on 2 cores) or CUDA

Stages, each resumable (rerun the same command after an interruption; finished stages are skipped, a stage in
progress continues from its last checkpoint in --work):

1. vae        AutoencoderKL (4x downsampling, 8 latent channels) on whole 64 px toy-world pictures
              (``--vae-crop`` < 64 trains on crops instead), 60 % of them with random textures (dots, stripes,
              outlines, washes of random period/angle/width, ``toyworld.random_look``). Loss: L1 + L2 on pixels,
              extra weight on colour (pixel minus its grey level), L1 on pixel gradients (sharp edges), a small KL.
2. latents    encode a fixed set of toy-world scenes once (posterior mean and std), 45 % plain and the rest in
              one or two random look families (``toyworld.pretraining_look``), captioned with the family words
              ("..., top left, dotted"); the latent scaling factor is 1/std of the latents, as for SD.
3. unet       UNet2DConditionModel + CLIP text encoder, jointly, from scratch: epsilon prediction on the cached
              latents (a fresh posterior sample each step), min-SNR-5 loss weights, 10% empty captions for
              classifier-free guidance, EMA weights; four cosine cycles, the last two with offset noise (dark
              and light backgrounds). The base learns the look *families* from generic words, as Stable
              Diffusion knows "halftone"; the benchmark's styles are single members an adapter must pin down.
3b. decoder  the VAE decoder alone, trained further on mostly textured pictures (the encoder, the latents and
              the UNet are unchanged by it): sharper textures for the styles adapters teach.
4. classifier the toy-world classifier (shape, colour, styles) that tests and benchmarks/style_quality.py use;
              half of each batch goes through the finished VAE, so it reads pictures as the base draws them,
              and a third of the pictures hold another member of a look family (``toyworld.other_member``),
              labelled as not that family's style.
5. export     fp16 ``stylelora/assets/tiny/tiny-toy-sd1.safetensors`` (EMA weights) + the classifier.

Every random draw of step s comes from a generator seeded by (seed, stage, s), so a resumed run ends exactly
where an uninterrupted one ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from stylelora.toy import world as toyworld  # noqa: E402
from stylelora.models import TINY_VERSION, TOY_TOKENIZER, TOY_WEIGHTS, build_toy_components, write_tiny_tokenizer  # noqa: E402

ASSETS = TOY_WEIGHTS.parent
SIZE = toyworld.SIZE
F_VAE = 4  # the VAE's downsampling factor
PROMPTS = ["a large red circle on a white background, in the center",
           "a small blue square on a black background, top left",
           "a large yellow triangle on a gray background, bottom right",
           "a small green circle on a white background, top right",
           "a large purple square on a black background, bottom left",
           "a small red triangle on a gray background, in the center",
           "a large red square on a white background, in the center, dotted",
           "a large blue circle on a gray background, in the center, outlined",
           "a large green triangle on a black background, in the center, faded"]


def log(work: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(work / "log.txt", "a") as f:
        f.write(line + "\n")


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], NCHW."""
    import numpy as np

    arr = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))
    return arr.permute(0, 3, 1, 2) / 127.5 - 1


def cosine_lr(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


# ------------------------------------------------------------------------------------------------ 1. VAE
def vae_batch(seed: int, step: int, batch: int, crop: int) -> torch.Tensor:
    rng = random.Random(f"vae:{seed}:{step}")
    images = []
    for _ in range(batch):
        scene = toyworld.sample_scene(rng, jitter=0.08)
        look = toyworld.random_look(rng) if rng.random() < 0.6 else toyworld.PLAIN
        img = toyworld.render(scene, look, SIZE)
        if crop >= SIZE:
            images.append(img)
            continue
        if rng.random() < 0.75:  # most crops hold part of the shape (a random crop is mostly background)
            cx, cy = (int((c + d) * SIZE) for c, d in zip(toyworld.POSITIONS[scene.position], (scene.dx, scene.dy)))
            x = min(max(cx - rng.randrange(4, crop - 4), 0), SIZE - crop) // F_VAE * F_VAE
            y = min(max(cy - rng.randrange(4, crop - 4), 0), SIZE - crop) // F_VAE * F_VAE
        else:  # aligned to the latent grid: textures in phase with it, as in whole pictures
            x, y = rng.randrange(0, SIZE + 1 - crop, F_VAE), rng.randrange(0, SIZE + 1 - crop, F_VAE)
        images.append(img.crop((x, y, x + crop, y + crop)))
    return to_tensor(images)


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, *, edge_weight: float, chroma_weight: float):
    """L1 + L2 on pixels, L1 on pixel gradients (sharp edges), and L1 + L2 on colour without the grey level
    (grey structure is learnt first; colour is slow without the extra weight)."""
    def grad(t):
        return t[..., 1:, :] - t[..., :-1, :], t[..., :, 1:] - t[..., :, :-1]

    (gy, gx), (ry, rx) = grad(x), grad(rec)
    cx, cr = x - x.mean(1, keepdim=True), rec - rec.mean(1, keepdim=True)
    return (F.l1_loss(rec, x) + F.mse_loss(rec, x) + edge_weight * (F.l1_loss(ry, gy) + F.l1_loss(rx, gx))
            + chroma_weight * (F.l1_loss(cr, cx) + F.mse_loss(cr, cx)))


def stage_vae(args, work: Path, device) -> None:
    path = work / "vae.pt"
    ck = load_ckpt(path)
    total = args.vae_steps + args.vae_polish_steps
    if ck and ck["step"] >= total:
        return
    vae = build_toy_components(pretrained=False)["vae"].to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    with torch.no_grad():  # start with a near-deterministic posterior (std e^-3): the decoder sees the signal at once
        c = vae.config.latent_channels  # quant_conv gives c means, then c log-variances
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(-6.0)
    start = 0
    if ck:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
        log(work, f"vae: resumed at step {start}")
    t0, acc = time.time(), 0.0
    for step in range(start, total):
        for g in opt.param_groups:  # one cosine cycle, then a warm restart at half the peak ("polish")
            g["lr"] = (cosine_lr(step, args.vae_steps, args.vae_lr, 50) if step < args.vae_steps else
                       cosine_lr(step - args.vae_steps, args.vae_polish_steps, args.vae_lr / 2, 0, floor=0.2))
        x = vae_batch(args.seed, step, args.vae_batch, args.vae_crop).to(device)
        torch.manual_seed(args.seed * 1_000_003 + step)  # the posterior sample
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (reconstruction_loss(rec, x, edge_weight=0.25, chroma_weight=args.chroma_weight)
                + args.kl_weight * post.kl().mean() / post.mean[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        acc += loss.item()
        done = step + 1
        if done % 25 == 0 or done == total:
            log(work, f"vae {done}/{total} loss {acc / 25:.4f} ({(time.time() - t0) / (done - start):.2f} s/step)")
            acc = 0.0
        if done % args.ckpt_every == 0 or done == total:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": done}, path)
        if done % args.preview_every == 0:
            preview_vae(vae.eval(), work, device)
            vae.train()
    preview_vae(vae.eval(), work, device)


@torch.no_grad()
def preview_vae(vae, work: Path, device, name: str = "vae_preview.png") -> None:
    from stylelora.grid import image_grid

    rng = random.Random(12345)
    imgs = [toyworld.render(toyworld.sample_scene(rng), toyworld.random_look(rng) if i % 2 else toyworld.PLAIN)
            for i in range(8)] + [toyworld.render(toyworld.sample_scene(rng), look)
                                  for look in toyworld.STYLES.values()]
    rec = vae.decode(vae.encode(to_tensor(imgs).to(device)).latent_dist.mean).sample
    err = (rec.cpu().clamp(-1, 1) - to_tensor(imgs)).abs().mean().item()
    image_grid([imgs, tensor_images(rec)], row_labels=["in", "vae"]).save(work / name)
    log(work, f"vae: preview L1 {err:.4f} -> {work / name}")


def tensor_images(x: torch.Tensor):
    from PIL import Image

    arr = ((x.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


# --------------------------------------------------------------------------------------------- 2. latents
@torch.no_grad()
def stage_latents(args, work: Path, device) -> None:
    path = work / "latents.pt"
    if path.exists():
        return
    vae = build_toy_components(pretrained=False)["vae"]
    vae.load_state_dict(load_ckpt(work / "vae.pt")["model"])
    vae.to(device).eval()
    rng = random.Random(f"latents:{args.seed}")
    scenes = [toyworld.sample_scene(rng) for _ in range(args.n_latents)]
    looks = [toyworld.pretraining_look(rng) for _ in scenes]  # plain, or one or two look families
    means, stds = [], []
    for i in range(0, len(scenes), 64):
        batch = [toyworld.render(s, lk) for s, lk in zip(scenes[i:i + 64], looks[i:i + 64])]
        dist = vae.encode(to_tensor(batch).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(args.seed))
    scale = 1.0 / sample.std().item()
    atomic_save({"mean": mean.half(), "std": std.half(),
                 "captions": [toyworld.described(s, lk) for s, lk in zip(scenes, looks)],
                 "scaling_factor": scale}, path)
    log(work, f"latents: {len(scenes)} scenes, latent mean {sample.mean():.3f} std {sample.std():.3f}, "
              f"scaling factor {scale:.4f}")


# ------------------------------------------------------------------------------------------------ 3. UNet
def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def stage_unet(args, work: Path, device) -> None:
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    path = work / "unet.pt"
    ck = load_ckpt(path)
    total = args.unet_steps + args.unet_polish_steps + args.unet_offset_steps + args.unet_extra_steps
    if ck and ck["step"] >= total:
        return
    data = load_ckpt(work / "latents.pt")
    write_tiny_tokenizer(work / "tokenizer", toyworld.vocabulary())
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    ids = tokenize(tokenizer, data["captions"])
    empty = tokenize(tokenizer, [""])[0]
    mean, std, sf = data["mean"].float(), data["std"].float(), data["scaling_factor"]
    parts = build_toy_components(pretrained=False)
    unet, te = parts["unet"].to(device).train(), parts["text_encoder"].to(device).train()
    ema = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema.update({f"text_encoder.{k}": v.detach().clone() for k, v in te.state_dict().items()})
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    start = 0
    if ck:
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["text_encoder"])
        opt.load_state_dict(ck["opt"])
        ema = ck["ema"]
        start = ck["step"]
        log(work, f"unet: resumed at step {start}")
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    t0, acc = time.time(), 0.0
    for step in range(start, total):
        # one cosine cycle, a warm restart at half the peak ("polish"), then a third at a third of the peak with
        # offset noise: with SD's noise schedule the mean of a latent is never fully noised, so a model trained on
        # plain noise keeps the mean brightness it starts from and cannot draw a black background. A fourth
        # cycle (--unet-extra-steps, offset noise still on) gives the text conditioning time: with textured
        # pictures in the data the UNet learnt to follow the caption much later than on plain ones
        offset_phase = step >= args.unet_steps + args.unet_polish_steps
        first, second = args.unet_steps, args.unet_steps + args.unet_polish_steps
        third = second + args.unet_offset_steps
        lr = (cosine_lr(step, args.unet_steps, args.unet_lr, 100) if step < first else
              cosine_lr(step - first, args.unet_polish_steps, args.unet_lr / 2, 0, floor=0.2) if step < second else
              cosine_lr(step - second, args.unet_offset_steps, args.unet_lr / 3, 0, floor=0.1) if step < third else
              cosine_lr(step - third, args.unet_extra_steps, args.unet_lr / 2, 0, floor=0.05))
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, len(mean), (args.batch,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * sf
        noise = torch.randn(z.shape, generator=gen)
        if offset_phase:  # per-sample, per-channel constant added to the noise
            noise = noise + args.noise_offset * torch.randn(z.shape[0], z.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        drop = torch.rand(args.batch, generator=gen) < 0.1  # classifier-free guidance: learn the empty caption too
        tok = torch.where(drop[:, None], empty[None], ids[idx])
        noisy = sched.add_noise(z, noise, t)
        cond = te(tok.to(device))[0]
        pred = unet(noisy.to(device), t.to(device), cond).sample
        w = (torch.clamp(snr[t], max=5.0) / snr[t]).to(device)  # min-SNR-5: do not over-weight easy steps
        loss = (w * F.mse_loss(pred, noise.to(device), reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            live = {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                    **{f"text_encoder.{k}": v for k, v in te.state_dict().items()}}
            for k, v in live.items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        acc += loss.item()
        done = step + 1
        if done % 25 == 0 or done == total:
            log(work, f"unet {done}/{total} loss {acc / 25:.4f} "
                      f"({(time.time() - t0) / (done - start):.2f} s/step)")
            acc = 0.0
        if done % args.ckpt_every == 0 or done == total:
            atomic_save({"unet": unet.state_dict(), "text_encoder": te.state_dict(), "opt": opt.state_dict(),
                         "ema": ema, "step": done}, path)
        if done % args.preview_every == 0 or done == total:
            preview(args, work, ema, sf, f"preview_{done:05d}.png")


# ------------------------------------------------------------------------------------------- 3b. decoder
def vae_weights(work: Path) -> dict:
    """The VAE's final weights: the decoder-polished ones where that stage ran, else the stage-1 ones."""
    ck = load_ckpt(work / "decoder.pt")
    return ck["model"] if ck else load_ckpt(work / "vae.pt")["model"]


def stage_decoder(args, work: Path, device) -> None:
    """More training for the VAE decoder alone, on pictures that are mostly textured (random looks).

    The encoder (and so every cached latent, and the UNet trained on them) stays exactly as it was: only the
    mapping from latents back to pixels gets sharper, which is what adapters that teach textures need.
    """
    path = work / "decoder.pt"
    ck = load_ckpt(path)
    total = args.decoder_steps
    if total <= 0 or (ck and ck["step"] >= total):
        return
    vae = build_toy_components(pretrained=False)["vae"].to(device)
    vae.load_state_dict(ck["model"] if ck else load_ckpt(work / "vae.pt")["model"])
    trainable = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for prm in vae.parameters():
        prm.requires_grad_(False)
    for prm in trainable:
        prm.requires_grad_(True)
    vae.eval()  # no dropout / batch statistics anywhere in it; eval keeps the frozen encoder untouched
    opt = torch.optim.AdamW(trainable, lr=args.decoder_lr, weight_decay=0.0)
    start = 0
    if ck:
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
        log(work, f"decoder: resumed at step {start}")
    t0, acc = time.time(), 0.0
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, args.decoder_lr, 20, floor=0.05)
        rng = random.Random(f"decoder:{args.seed}:{step}")
        imgs = [toyworld.render(toyworld.sample_scene(rng, jitter=0.08), toyworld.random_look(rng, p=0.6))
                for _ in range(args.vae_batch)]
        x = to_tensor(imgs).to(device)
        torch.manual_seed(args.seed * 1_000_003 + 500_000 + step)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = reconstruction_loss(rec, x, edge_weight=0.5, chroma_weight=args.chroma_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        acc += loss.item()
        done = step + 1
        if done % 25 == 0 or done == total:
            log(work, f"decoder {done}/{total} loss {acc / 25:.4f} ({(time.time() - t0) / (done - start):.2f} s/step)")
            acc = 0.0
        if done % args.ckpt_every == 0 or done == total:
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": done}, path)
    preview_vae(vae.eval(), work, device, name="decoder_preview.png")


def assemble(work: Path, ema: dict, scaling_factor: float):
    """A StableDiffusionPipeline from the stage outputs (EMA UNet/text encoder, trained VAE)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    parts = build_toy_components(pretrained=False)
    parts["unet"].load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})
    parts["text_encoder"].load_state_dict({k[13:]: v for k, v in ema.items() if k.startswith("text_encoder.")})
    parts["vae"].load_state_dict(vae_weights(work))
    parts["vae"].register_to_config(scaling_factor=scaling_factor)
    write_tiny_tokenizer(work / "tokenizer", toyworld.vocabulary())
    pipe = StableDiffusionPipeline(**parts, tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def preview(args, work: Path, ema: dict, sf: float, name: str, prompts=PROMPTS, seeds=(0, 1)) -> Path:
    from stylelora.grid import image_grid

    pipe = assemble(work, ema, sf)
    rows = [[pipe(p, num_inference_steps=20, guidance_scale=args.cfg, generator=torch.Generator().manual_seed(s))
             .images[0] for p in prompts] for s in seeds]
    out = work / name
    image_grid(rows, col_labels=[p.split(" on ")[0][2:] for p in prompts]).save(out)
    log(work, f"preview -> {out}")
    return out


# -------------------------------------------------------------------------------------- 4-5. classifier, export
def stage_classifier(args, work: Path) -> None:
    from stylelora.toy import classifiers

    path = work / "classifier.safetensors"
    if not path.exists():
        vae = build_toy_components(pretrained=False)["vae"]
        vae.load_state_dict(vae_weights(work))
        classifiers.train_classifier(path, steps=args.clf_steps, seed=args.seed, log=lambda m: log(work, m),
                                     roundtrip=classifiers.vae_roundtrip(vae.eval()))


def stage_export(args, work: Path, command: str, wall: float) -> None:
    from safetensors.torch import save_file

    from stylelora.toy import classifiers

    ck, data = load_ckpt(work / "unet.pt"), load_ckpt(work / "latents.pt")
    tensors = {k: v.half().contiguous() for k, v in ck["ema"].items() if v.is_floating_point()}
    tensors.update({f"vae.{k}": v.half().contiguous() for k, v in vae_weights(work).items()})
    meta = {"format": "stylelora-tiny-toy-sd1", "tiny_version": TINY_VERSION, "vae.scaling_factor": repr(data["scaling_factor"]),
            "command": command, "seed": str(args.seed), "args": json.dumps(vars(args))}
    ASSETS.mkdir(parents=True, exist_ok=True)
    tmp = TOY_WEIGHTS.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, TOY_WEIGHTS)
    write_tiny_tokenizer(TOY_TOKENIZER, toyworld.vocabulary())
    clf = classifiers.CLASSIFIER_WEIGHTS
    clf.write_bytes((work / "classifier.safetensors").read_bytes())
    log(work, f"export: {TOY_WEIGHTS} ({TOY_WEIGHTS.stat().st_size / 1e6:.1f} MB), {clf}; wall {wall / 60:.1f} min")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default=str(HERE.parent / "out" / "pretrain-tiny"), help="checkpoints, logs, previews")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    p.add_argument("--vae-steps", type=int, default=1400)
    p.add_argument("--vae-polish-steps", type=int, default=400, help="a second, lower cosine cycle after --vae-steps")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=64, help="VAE training crop side (px, multiple of 4; 64 = whole pictures)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--chroma-weight", type=float, default=3.0,
                   help="extra weight on colour errors (grey structure is learnt first; colour is slow without it)")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="KL weight per latent element (vs L1 per pixel)")
    p.add_argument("--decoder-steps", type=int, default=600, help="decoder-only polish after the UNet (0: none)")
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--n-latents", type=int, default=16000, help="scenes encoded for the UNet stage (plain, or in one or two random looks)")
    p.add_argument("--unet-steps", type=int, default=1300)
    p.add_argument("--unet-polish-steps", type=int, default=900, help="a second, lower cosine cycle after --unet-steps")
    p.add_argument("--unet-offset-steps", type=int, default=600, help="a third cycle with offset noise")
    p.add_argument("--unet-extra-steps", type=int, default=1500,
                   help="a fourth cycle (half the peak lr, offset noise on) for the text conditioning")
    p.add_argument("--noise-offset", type=float, default=0.1, help="offset-noise strength of the third and fourth cycles")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=6e-4)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale of the preview grids")
    p.add_argument("--clf-steps", type=int, default=1500)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--preview-every", type=int, default=300)
    p.add_argument("--stages", default="vae,latents,unet,decoder,classifier,export")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python examples/pretrain_tiny_base.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stages = args.stages.split(",")
    log(work, f"start: {command} on {device}")
    for name, fn in [("vae", lambda: stage_vae(args, work, device)), ("latents", lambda: stage_latents(args, work, device)),
                     ("unet", lambda: stage_unet(args, work, device)),
                     ("decoder", lambda: stage_decoder(args, work, device)), ("classifier", lambda: stage_classifier(args, work))]:
        if name in stages:
            s = time.time()
            fn()
            add_time(work, name, time.time() - s)
    if "export" in stages:
        stage_export(args, work, command, sum(json.loads((work / "times.json").read_text()).values()))


def add_time(work: Path, stage: str, seconds: float) -> None:
    """Wall time per stage, summed over interrupted and resumed runs (times.json in --work)."""
    path = work / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[stage] = round(times.get(stage, 0) + seconds, 1)
    path.write_text(json.dumps(times, indent=1))
    log(work, f"stage {stage} done ({seconds:.0f} s this run, {times[stage]:.0f} s in all)")


if __name__ == "__main__":
    main()
