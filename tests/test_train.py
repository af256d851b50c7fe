"""Training on the tiny base: only LoRA changes, identity at init, save/load, resume after a kill, cache, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stylelora import lora
from stylelora.config import ConfigError, DataConfig, NetworkConfig, RunConfig, TrainConfig
from stylelora.errors import DataError, TrainingError
from stylelora.models import load_base
from stylelora.training import train

REPO = Path(__file__).resolve().parents[1]


def quick_config(folder, output, **run) -> TrainConfig:
    run = {"steps": 2, "batch_size": 2, "base": "tiny-random", **run}
    return TrainConfig(
        data=DataConfig(folder=str(folder), trigger="zzstyle", resolution=128, cache_dir=str(Path(output).parent / "cache")),
        network=NetworkConfig(rank=4),
        run=RunConfig(output=str(output), **run),
    )


def straight_and_resumed(config, stop_after: int = 2, on_step=None) -> tuple[Path, Path]:
    """Train ``config("a")`` straight, and ``config("b")`` stopped cooperatively (``should_stop``) after
    ``stop_after`` steps, then resumed with ``resume="latest"``; returns both adapter files. ``on_step(run)``, if
    given, makes the step callback for run "a" or "b" (the stopped and the resumed part share one)."""
    from stylelora.errors import TrainingCancelled
    from stylelora.training import train

    straight = train(config("a"), on_step=on_step("a") if on_step else None)
    polls = []
    second = on_step("b") if on_step else None
    with pytest.raises(TrainingCancelled, match=f"step {stop_after}"):
        train(config("b"), should_stop=lambda: polls.append(1) or len(polls) >= stop_after, on_step=second)
    cfg = config("b")
    cfg.run.resume = "latest"
    return straight, train(cfg, on_step=second)


def cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "stylelora", *args], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout[-3000:]}\nstderr:{p.stderr[-3000:]}")
    return p


def test_two_steps_change_only_lora_parameters(style_dir, tmp_path):
    base = load_base("tiny-random")
    before = {n: {k: v.clone() for k, v in getattr(base.pipe, n).state_dict().items()}
              for n in ("unet", "text_encoder", "vae")}
    cfg = quick_config(style_dir, tmp_path / "a.safetensors")
    cfg.network.train_text_encoder = True
    out = train(cfg, base=base)
    assert out.exists()
    # every base tensor is bitwise what it was, and no extra (LoRA) module is left behind
    for n, sd in before.items():
        after = getattr(base.pipe, n).state_dict()
        assert after.keys() == sd.keys(), n
        for k, v in sd.items():
            assert torch.equal(after[k], v), f"{n}.{k} changed"
    # ...while the LoRA weights did train: B started at zero and is not zero after two steps
    params = load_file(str(tmp_path / "a-checkpoints" / "step-000002" / "lora.safetensors"))
    ups = [v for k, v in params.items() if "lora_B" in k]
    assert ups and any(k.startswith("text_encoder.") for k in params)
    assert all(v.abs().sum() > 0 for v in ups)


def test_fresh_adapter_leaves_outputs_unchanged():
    pipe = load_base("tiny-random").pipe
    x, t, ids = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randint(0, 512, (2, 77))
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        ref_unet = pipe.unet(x, t, hidden).sample
    lora.inject(pipe.unet, rank=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0"])
    lora.inject(pipe.text_encoder, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "out_proj"])
    assert len(list(lora.lora_layers(pipe.unet, "default"))) == 56  # 7 attention blocks x (attn1, attn2) x (q, k, v, out)
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], hidden)
        assert torch.equal(pipe.unet(x, t, hidden).sample, ref_unet)


def test_saved_adapter_reproduces_trained_outputs(style_dir, tmp_path):
    from stylelora.formats import load_adapter

    cfg = quick_config(style_dir, tmp_path / "s.safetensors", steps=3, sample_prompts=["zzstyle, a tree"],
                       sample_steps=4)
    cfg.network.train_text_encoder = True
    cfg.optim.lr = 1e-2  # large enough that the adapter visibly changes the image
    out = train(cfg)
    sample = np.asarray(Image.open(tmp_path / "s-samples" / "step-000003-0.png"), dtype=np.int16)

    def render(pipe):
        g = torch.Generator().manual_seed(cfg.run.sample_seed)
        return np.asarray(pipe("zzstyle, a tree", num_inference_steps=4, height=128, width=128, generator=g).images[0],
                          dtype=np.int16)

    fresh = load_base("tiny-random").pipe
    fresh.set_progress_bar_config(disable=True)
    plain = render(fresh)
    lora.attach(fresh, load_adapter(out, pipe=fresh), "s")
    with_adapter = render(fresh)
    assert np.abs(with_adapter - sample).max() <= 1
    assert np.abs(plain - sample).max() > 5  # the adapter matters


def _run_cli_train(folder, out, steps, *extra, env=None, check=True):
    return cli("train", str(folder), "-o", str(out), "--base", "tiny-random", "--trigger", "zzstyle", "--resolution", "128", "--rank", "4",
               "--steps", str(steps), "--batch-size", "2", "--checkpoint-every", "2", "--random-flip", "--lr", "1e-3",
               "--cache-dir", str(Path(out).parent / "cache"), *extra, env=env, check=check)


def worker(*args, env=None, check=True) -> subprocess.CompletedProcess:
    """tests/train_worker.py: the CLI in a process of its own, with a step callback (see its docstring)."""
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    p = subprocess.run([sys.executable, str(REPO / "tests" / "train_worker.py"), *args], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout[-3000:]}\nstderr:{p.stderr[-3000:]}")
    return p


def test_resume_after_kill_equals_uninterrupted(style_dir, tmp_path):
    a, b = tmp_path / "a" / "x.safetensors", tmp_path / "b" / "x.safetensors"
    _run_cli_train(style_dir, a, 6)
    args = ["train", str(style_dir), "-o", str(b), "--base", "tiny-random", "--trigger", "zzstyle", "--resolution",
            "128", "--rank", "4", "--steps", "6", "--batch-size", "2", "--checkpoint-every", "2", "--random-flip",
            "--lr", "1e-3", "--cache-dir", str(b.parent / "cache")]
    killed = worker("--kill-after-step", "5", "--", *args, check=False)  # the step callback SIGKILLs its process
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no cleanup ran
    assert not b.exists()
    assert sorted(p.name for p in (b.parent / "x-checkpoints").iterdir()) == ["step-000002", "step-000004"]
    _run_cli_train(style_dir, b, 6, "--resume", "latest")
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_resume_refuses_changed_settings(style_dir, tmp_path):
    out = tmp_path / "r.safetensors"
    train(quick_config(style_dir, out, checkpoint_every=1))
    cfg = quick_config(style_dir, out, steps=3, resume="latest")
    cfg.network.rank = 8
    with pytest.raises(TrainingError, match="network.rank"):
        train(cfg)


def test_cache_reuses_latents_and_reencodes_only_the_edited_image(style_dir, tmp_path):
    from stylelora.data import scan_folder
    from stylelora.dataset import TrainingSet

    pipe = load_base("tiny-random").pipe
    cfg = DataConfig(folder=str(style_dir), trigger="zzstyle", resolution=128, random_flip=True)

    def prepared():
        items = scan_folder(style_dir, trigger="zzstyle")
        ts = TrainingSet(items, cfg, pipe, cache_root=tmp_path / "cache", cache_text=True, device=torch.device("cpu"),
                         weight_dtype=torch.float32)
        ts.prepare()
        return ts

    first = prepared()
    n = len(first.items)
    assert (first.latent_cache.stats.misses, first.latent_cache.stats.hits) == (2 * n, 0)  # both flips encoded
    second = prepared()
    assert (second.latent_cache.stats.misses, second.latent_cache.stats.hits) == (0, 2 * n)
    assert second.text_cache.stats.misses == 0
    img = Image.open(style_dir / "img1.png")
    img.putpixel((0, 0), (0, 255, 0))
    img.save(style_dir / "img1.png")
    third = prepared()
    assert (third.latent_cache.stats.misses, third.latent_cache.stats.hits) == (2, 2 * n - 2)
    # flipped latents really are of the flipped image
    assert not torch.equal(third._latents[(0, False)]["mean"], third._latents[(0, True)]["mean"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(style_dir, tmp_path, monkeypatch):
    import stylelora.training as T

    real = T.compute_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(T, "compute_loss", poisoned)
    out = tmp_path / "n.safetensors"
    with pytest.raises(TrainingError, match=r"NaN.*step-000002"):
        train(quick_config(style_dir, out, steps=6, checkpoint_every=2, log_every=1))
    assert not out.exists()
    ckpts = sorted(p.name for p in (tmp_path / "n-checkpoints").iterdir())
    assert ckpts == ["step-000002"]
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "n-checkpoints/step-000002/lora.safetensors")).values())


@pytest.mark.parametrize("case", ["empty", "missing", "corrupt"])
def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, case):
    folder = tmp_path / "imgs"
    if case != "missing":
        folder.mkdir()
    if case == "corrupt":
        from conftest import make_style_images

        make_style_images(folder, 2)
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out" / "x.safetensors"
    p = cli("train", str(folder), "-o", str(out), "--base", "tiny-random", "--trigger", "t", "--steps", "1", check=False)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert str(folder) in p.stderr
    if case == "corrupt":
        assert "broken.png" in p.stderr and "--skip-bad-images" in p.stderr
    assert not out.parent.exists()


def test_skip_bad_images_trains_on_the_rest(tmp_path):
    from conftest import make_style_images

    folder = make_style_images(tmp_path / "imgs", 2)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "x.safetensors"
    with pytest.warns(UserWarning, match="broken.jpg"):
        cfg = quick_config(folder, out, steps=1)
        cfg.data.skip_bad_images = True
        train(cfg)
    assert out.exists()


def test_config_toml_flags_and_unknown_keys(tmp_path):
    from stylelora.cli import build_parser
    from stylelora.cli.train import config_from_args

    toml = tmp_path / "t.toml"
    toml.write_text('[data]\nfolder = "imgs"\nresolution = 256\n[network]\nrank = 8\n[optim]\nlr = 2e-4\n')
    args = build_parser().parse_args(["train", "-c", str(toml), "--rank", "4", "--no-cache-latents",
                                      "--unet-targets", "to_q,to_v", "-o", "y.safetensors"])
    cfg = config_from_args(args)
    assert (cfg.data.folder, cfg.data.resolution, cfg.network.rank, cfg.optim.lr) == ("imgs", 256, 4, 2e-4)
    assert cfg.data.cache_latents is False and cfg.network.unet_targets == ["to_q", "to_v"]
    assert cfg.run.output == "y.safetensors"
    toml.write_text("[network]\nrnak = 8\n")
    with pytest.raises(ConfigError, match="rnak"):
        TrainConfig.from_toml(toml)
    with pytest.raises(ConfigError, match="rank"):
        NetworkConfig(rank=0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_multi_process_training_writes_one_adapter(style_dir, tmp_path, monkeypatch):
    """2 CPU processes (gloo DDP): one adapter; the ranks see different samples; gradients are all-reduced, so both
    ranks end with the weights of one process training on the same global batch (2 x 2 images = grad_accum 2)."""
    import json
    import socket

    import stylelora.training as T
    from train_worker import lora_weights, per_sample_noise, sgd_optimizer

    out = tmp_path / "mp" / "m.safetensors"
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu multi-process mode needs MPI; its torchrun path runs on CPU (gloo) with ACCELERATE_USE_CPU.
    # SGD and per-sample noise make the update a linear function of the global batch's mean gradient (see worker).
    with socket.socket() as sock:  # a free port: other test runs on this machine may hold accelerate's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "tests" / "train_worker.py"),
           "--record", str(tmp_path / "rec"), "--sgd", "--per-sample-noise", "--", "train", str(style_dir),
           "-o", str(out), "--base", "tiny-random", "--trigger", "zzstyle", "--resolution", "128", "--rank", "4", "--steps", "2",
           "--batch-size", "2", "--lr", "0.5", "--cache-dir", str(tmp_path / "cache")]
    p = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore", **env}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert out.exists()
    assert [f.name for f in out.parent.iterdir() if f.suffix == ".safetensors"] == ["m.safetensors"]
    state = (out.parent / "m-checkpoints" / "step-000002" / "state.json").read_text()
    assert '"world": 2' in state
    assert p.stdout.count("wrote ") == 1

    recs = [json.loads((tmp_path / "rec" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and len(r["indices"]) == 2 for r in recs)
    for step in range(2):  # in each step the two processes trained on different images
        a, b = (set(sum(r["indices"][step], [])) for r in recs)
        assert a and b and not a & b, (step, a, b)
    w0, w1 = (load_file(str(tmp_path / "rec" / f"rank-{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys() and any("lora_B" in k and w0[k].abs().sum() > 0 for k in w0)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # DDP synchronised the gradients

    # one process, same global batch per step: micro-batch m = 2·step + a here is micro-batch 2·step + rank there
    monkeypatch.setattr(T, "make_optimizer", sgd_optimizer)
    monkeypatch.setattr(T, "compute_loss", per_sample_noise(T.compute_loss))
    single = {}
    cfg = quick_config(style_dir, tmp_path / "sp" / "s.safetensors", grad_accum=2)
    cfg.optim.lr = 0.5
    seen = []

    def on_step(info):
        seen.append(info.indices)
        if info.step == info.steps:
            single.update(lora_weights(info.models))

    train(cfg, on_step=on_step)
    assert seen == [[recs[0]["indices"][s][0], recs[1]["indices"][s][0]] for s in range(2)]
    assert single.keys() == w0.keys()
    for k in w0:
        torch.testing.assert_close(w0[k], single[k], rtol=1e-4, atol=1e-6, msg=k)


def test_data_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError):
        train(quick_config(tmp_path / "nope", tmp_path / "o.safetensors"))


def test_regularization_images_keep_their_captions_and_train_beside_the_style(style_dir, tmp_path):
    """Prior preservation: reg images never get the trigger, are listed as their own dataset dir, and train."""
    import json

    from safetensors import safe_open

    from conftest import make_style_images

    from stylelora.training import regularization_items

    reg = tmp_path / "plain"
    make_style_images(reg, 2, seed=5)  # img0 has a caption file, img1 none
    (reg / "img0.txt").write_text("a plain picture", encoding="utf-8")
    items = {it.path.name: it for it in regularization_items(str(reg))}
    assert items["img0.png"].caption == "a plain picture" and items["img1.png"].caption == ""
    assert {it.subset for it in items.values()} == {"reg/plain"}

    out = tmp_path / "r" / "x.safetensors"
    cfg = quick_config(style_dir, out).replace(reg_folder=str(reg))
    assert train(cfg) == out
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    dirs = json.loads(md["ss_dataset_dirs"])
    assert dirs["reg/plain"]["img_count"] == 2 and sum(d["img_count"] for d in dirs.values()) == 6
    assert "zzstyle" not in json.dumps(json.loads(md["ss_tag_frequency"])["reg/plain"])


def test_caption_dropout_trains_the_empty_caption(style_dir, tmp_path, monkeypatch):
    from stylelora import training
    from stylelora.data import scan_folder
    from stylelora.dataset import TrainingSet

    with pytest.raises(ConfigError, match="caption_dropout"):
        DataConfig(folder=str(style_dir), caption_dropout=1.0)
    pipe = load_base("tiny-random").pipe
    cfg = DataConfig(folder=str(style_dir), trigger="zzstyle", resolution=128, caption_dropout=0.5)
    ts = TrainingSet(scan_folder(style_dir, trigger="zzstyle"), cfg, pipe, cache_root=tmp_path / "cache",
                     cache_text=True, device=torch.device("cpu"), weight_dtype=torch.float32)
    ts.prepare()
    assert ts.captions([0, 1], drop=[True, False]) == ["", ts.items[1].caption]
    empty = ts.text.encode(ts.encoders, ts.text.tokenize([""]))["hidden"][0]
    assert torch.equal(ts.cached_text([0, 1], drop=[True, False])["hidden"][0], empty)  # cached with the rest

    # in a run, about half the captions the step encodes are empty; without dropout none is
    seen = []
    real = TrainingSet.cached_text

    def spy(self, indices, drop=None):
        seen.extend(self.captions(indices, drop))
        return real(self, indices, drop)

    monkeypatch.setattr(TrainingSet, "cached_text", spy)
    for rate, expect_empty in ((0.5, True), (0.0, False)):
        seen.clear()
        c = quick_config(style_dir, tmp_path / f"d{rate}.safetensors", steps=8)
        c.data.caption_dropout = rate
        training.train(c)
        assert len(seen) == 16 and (0 < seen.count("") < 16) == expect_empty and ("" in seen) == expect_empty, seen


def test_a_stop_seen_by_one_process_stops_both_at_the_same_step(style_dir, tmp_path):
    """Under `accelerate launch`, a stop asked on one process only (a signal, the UI) must stop every process at the
    same step: each reaches the checkpoint's barrier, nobody waits there forever."""
    import socket

    out = tmp_path / "mp" / "m.safetensors"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "tests" / "train_worker.py"), "--stop-after-step", "2", "--stop-rank", "1", "--", "train",
           str(style_dir), "-o", str(out), "--base", "tiny-random", "--trigger", "zzstyle", "--resolution", "64",
           "--rank", "2", "--steps", "6", "--batch-size", "1", "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "training stopped at step 3" in p.stderr, p.stderr[-3000:]
    assert (out.parent / "m-checkpoints" / "step-000003" / "state.json").is_file()
    assert not out.exists()  # stopped, not finished
