"""The training math users run, each checked against an independent reference written here: min-SNR weights from
alphas_cumprod, the noise (offset) and targets as drawn, grad_accum == the doubled batch, the LR schedule from
diffusers' formulas, LoRA dropout, random crops, checkpoint pruning, and the PEFT layout read by diffusers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_train import quick_config
from train_worker import lora_weights, per_sample_noise, sgd_optimizer

import stylelora.training as T
from stylelora.config import DataConfig
from stylelora.data import scan_folder
from stylelora.dataset import TrainingSet
from stylelora.models import load_base
from stylelora.training import compute_loss, train


class RecordingUNet:
    """Stands in for the UNet: predicts zeros (so the loss is the mean squared target) and records its inputs."""

    def __call__(self, noisy, t, hidden, **kw):
        self.noisy, self.t = noisy.detach().clone(), t.detach().clone()
        return SimpleNamespace(sample=torch.zeros_like(noisy))


@pytest.fixture(scope="module")
def loss_setup(tmp_path_factory):
    from conftest import make_style_images

    folder = make_style_images(tmp_path_factory.mktemp("math") / "style")
    pipe = load_base("tiny-random").pipe
    cfg = DataConfig(folder=str(folder), trigger="zzstyle", resolution=128)
    tset = TrainingSet(scan_folder(folder, trigger="zzstyle"), cfg, pipe, cache_root=folder.parent / "cache",
                       cache_text=True, device=torch.device("cpu"), weight_dtype=torch.float32)
    tset.prepare()
    return folder, pipe, tset


def _scheduler(pipe, prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)


def _loss(tset, pipe, folder, seed, prediction_type, indices=(0,), **optim):
    cfg = quick_config(folder, folder.parent / "unused.safetensors")
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    unet = RecordingUNet()
    loss = compute_loss(tset, list(indices), torch.Generator().manual_seed(seed), unet, [],
                        _scheduler(pipe, prediction_type), cfg, prediction_type, False)
    return loss, unet


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_matches_the_formula(loss_setup, prediction_type):
    """loss(γ) / loss(no weighting) for one sample is min(snr, γ)/snr (epsilon) or min(snr, γ)/(snr + 1) (v)."""
    folder, pipe, tset = loss_setup
    gamma = 5.0
    alphas_cumprod = pipe.scheduler.alphas_cumprod.double()
    regimes = {"clamped": 0, "not clamped": 0}
    for seed in range(400):
        weighted, unet = _loss(tset, pipe, folder, seed, prediction_type, min_snr_gamma=gamma)
        plain, _ = _loss(tset, pipe, folder, seed, prediction_type, min_snr_gamma=None)
        a = alphas_cumprod[int(unet.t[0])]
        snr = a / (1 - a)
        expected = min(snr, gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
        assert float(weighted / plain) == pytest.approx(float(expected), rel=1e-5), (seed, int(unet.t[0]))
        regimes["clamped" if snr > gamma else "not clamped"] += 1
        if min(regimes.values()) >= 3:
            break
    assert min(regimes.values()) >= 3, regimes  # both sides of γ were checked


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_offset_noisy_latents_and_target_as_drawn(loss_setup, prediction_type):
    """The noise is randn(b,c,h,w) + offset·randn(b,c,1,1), drawn after the batch and before the timesteps; the
    UNet sees √ᾱ·x₀ + √(1-ᾱ)·noise and is trained towards noise (epsilon) or √ᾱ·noise - √(1-ᾱ)·x₀ (v)."""
    folder, pipe, tset = loss_setup
    offset, seed, indices = 0.3, 7, [0, 2]
    loss, unet = _loss(tset, pipe, folder, seed, prediction_type, indices, noise_offset=offset, min_snr_gamma=None)

    replay = torch.Generator().manual_seed(seed)
    x0 = tset.batch(indices, replay)["latents"]
    b, c = x0.shape[:2]
    noise = torch.randn(x0.shape, generator=replay) + offset * torch.randn((b, c, 1, 1), generator=replay)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (b,), generator=replay)
    assert torch.equal(unet.t, t)
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(unet.noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-5, atol=1e-5)
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert float(loss) == pytest.approx(float((target ** 2).mean()), rel=1e-5)
    # and the offset is really there: without it the same draws give a different loss
    no_offset, _ = _loss(tset, pipe, folder, seed, prediction_type, indices, min_snr_gamma=None)
    assert float(no_offset) != pytest.approx(float(loss), rel=1e-3)


def test_grad_accum_2_equals_one_step_of_the_doubled_batch(style_dir, tmp_path, monkeypatch):
    """Two micro-batches of 1 accumulate to the gradient of one batch of 2. SGD makes the update linear in the
    gradient and per-sample noise makes a sample's loss independent of its batch (see tests/train_worker.py)."""
    for f in ("img1.png", "img3.png"):  # keep the two images of one bucket, so a batch of 2 can hold both
        (style_dir / f).unlink()
    monkeypatch.setattr(T, "make_optimizer", sgd_optimizer)
    monkeypatch.setattr(T, "compute_loss", per_sample_noise(T.compute_loss))
    runs = {}
    for name, batch_size, accum in (("accum", 1, 2), ("batch", 2, 1)):
        seen, end = [], {}
        cfg = quick_config(style_dir, tmp_path / name / "a.safetensors", batch_size=batch_size, grad_accum=accum)
        cfg.optim.lr = 0.5

        def on_step(info, seen=seen, end=end):
            seen.append(sorted(i for mb in info.indices for i in mb))
            if info.step == info.steps:
                end.update(lora_weights(info.models))

        train(cfg, on_step=on_step)
        runs[name] = (seen, end)
    (seen_a, wa), (seen_b, wb) = runs["accum"], runs["batch"]
    assert seen_a == seen_b == [[0, 1], [0, 1]]
    assert wa.keys() == wb.keys() and any("lora_B" in k and wa[k].abs().sum() > 0 for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


def _diffusers_factor(name: str, s: int, warmup: int, total: int) -> float:
    """LR multiplier at scheduler step s, written from diffusers.optimization's definitions."""
    if name == "constant":
        return 1.0  # diffusers' "constant" ignores warmup
    if s < warmup:
        return s / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = (s - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, (total - s) / max(1, total - warmup))
    if name == "cosine":  # num_cycles = 0.5
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise AssertionError(name)


@pytest.mark.parametrize("scheduler,te_lr", [("cosine", 4e-4), ("linear", None), ("constant_with_warmup", 4e-4),
                                             ("constant", None)])
def test_te_lr_scheduler_and_warmup_reach_the_optimizer(style_dir, tmp_path, scheduler, te_lr):
    steps, warmup, lr = 5, 2, 1e-3
    cfg = quick_config(style_dir, tmp_path / "l.safetensors", steps=steps)
    cfg.network.train_text_encoder = True
    cfg.optim.lr, cfg.optim.te_lr, cfg.optim.lr_scheduler, cfg.optim.warmup_steps = lr, te_lr, scheduler, warmup
    lrs = []
    train(cfg, on_step=lambda info: lrs.append(info.lrs))
    for s, got in enumerate(lrs):
        f = _diffusers_factor(scheduler, s, warmup, steps)
        assert got == pytest.approx([lr * f, (lr if te_lr is None else te_lr) * f], rel=1e-9, abs=1e-15), (s, got)
    assert len(lrs) == steps


def test_lora_dropout_is_on_the_injected_layers_and_active_in_training(style_dir, tmp_path):
    from peft.tuners.lora import LoraLayer

    cfg = quick_config(style_dir, tmp_path / "d.safetensors", steps=1)
    cfg.network.dropout = 0.5
    cfg.optim.lr = 1e-2  # B moves away from zero, so the LoRA path (and its dropout) shows in the output
    checked = {}

    def on_step(info):
        unet = info.models["unet"]
        layers = [m for m in unet.modules() if isinstance(m, LoraLayer) and T.ADAPTER_NAME in m.lora_A]
        drops = [m.lora_dropout[T.ADAPTER_NAME] for m in layers]
        checked["layers"] = len(layers)
        checked["dropout"] = all(isinstance(d, torch.nn.Dropout) and d.p == 0.5 for d in drops)
        checked["training"] = unet.training and all(d.training for d in drops)
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
        hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
        with torch.no_grad():
            train_outs = [unet(x, t, hidden).sample for _ in range(2)]
            unet.eval()
            eval_outs = [unet(x, t, hidden).sample for _ in range(2)]
            unet.train()
        checked["train differ"] = not torch.equal(*train_outs)
        checked["eval equal"] = torch.equal(*eval_outs)

    train(cfg, on_step=on_step)
    assert checked == {"layers": 56, "dropout": True, "training": True, "train differ": True, "eval equal": True}


def test_random_crop_varies_the_crops_and_skips_the_latent_cache(style_dir, tmp_path, monkeypatch):
    import stylelora.data as D

    real = D.prepare_pixels
    calls = []

    def spy(img, bucket, *, crop, **kw):
        out = real(img, bucket, crop=crop, **kw)
        calls.append((img.size, crop, tuple(out[1])))
        return out

    monkeypatch.setattr(D, "prepare_pixels", spy)
    cfg = quick_config(style_dir, tmp_path / "c.safetensors", steps=4)
    cfg.data.random_crop, cfg.data.default_repeats = True, 2
    train(cfg)
    assert calls and all(crop == "random" for _, crop, _ in calls)  # nothing was encoded into a latent cache
    assert len(calls) == 4 * 2  # one VAE encode per sample drawn: steps x batch size
    wide = [tl for size, _, tl in calls if size[0] > size[1]]  # 192x128 images cropped into a 128x128 bucket
    assert len(wide) >= 2 and len(set(wide)) > 1, wide


def test_keep_checkpoints_keeps_exactly_the_newest(style_dir, tmp_path):
    out = tmp_path / "k.safetensors"
    root = tmp_path / "k-checkpoints"
    cfg = quick_config(style_dir, out, steps=5, checkpoint_every=1, keep_checkpoints=2)
    listed = []
    train(cfg, on_step=lambda info: listed.append(sorted(p.name for p in root.iterdir())))
    names = [f"step-{s:06d}" for s in range(1, 6)]
    assert listed[:4] == [names[max(0, s - 2):s] for s in range(1, 5)]  # at most 2, the newest
    assert sorted(p.name for p in root.iterdir()) == names[-2:]  # the final state is a checkpoint too


def test_peft_format_loads_in_diffusers_and_reproduces_the_trained_outputs(style_dir, tmp_path):
    from safetensors import safe_open

    cfg = quick_config(style_dir, tmp_path / "p.safetensors", format="peft")
    cfg.network.train_text_encoder = True
    cfg.optim.lr = 1e-2
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    ids = torch.randint(0, 400, (1, 77), generator=torch.Generator().manual_seed(1))
    trained = {}

    def on_step(info):  # the trained model's outputs, in eval mode, after the last step
        if info.step != info.steps:
            return
        unet, te = info.models["unet"], info.models["text_encoder"]
        unet.eval(), te.eval()
        with torch.no_grad():
            trained["hidden"] = te(ids)[0]
            trained["unet"] = unet(x, t, trained["hidden"]).sample
        unet.train(), te.train()

    out = train(cfg, on_step=on_step)
    with safe_open(str(out), "pt") as f:
        keys, md = list(f.keys()), f.metadata()
    assert keys and all(k.split(".")[0] in ("unet", "text_encoder") for k in keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "lora_adapter_metadata" in md

    fresh = load_base("tiny-random").pipe
    fresh.load_lora_weights(str(out))  # diffusers' own loader
    with torch.no_grad():
        hidden = fresh.text_encoder(ids)[0]
        torch.testing.assert_close(hidden, trained["hidden"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fresh.unet(x, t, hidden).sample, trained["unet"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = load_base("tiny-random").pipe.unet(x, t, hidden).sample
    assert (plain - trained["unet"]).abs().max() > 1e-3  # the adapter matters
