"""SD2 (v-prediction) and SDXL: detection, training targets, micro-conditioning, files other tools load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from stylelora import lora
from stylelora.config import DataConfig, NetworkConfig, RunConfig, TrainConfig
from stylelora.errors import ConfigError, DataError
from stylelora.formats import load_adapter, read_metadata
from stylelora.models import load_base


def config(folder, out, base, **run):
    return TrainConfig(
        data=DataConfig(folder=str(folder), trigger="zzstyle", resolution=128, cache_dir=str(out.parent / "cache")),
        network=NetworkConfig(rank=4, alpha=2, train_text_encoder=True),
        run=RunConfig(base=base, output=str(out), steps=2, batch_size=2, **run),
    )


@pytest.mark.parametrize("spec,key,version,arch,pred", [
    ("tiny-random", "sd1", "sd_v1", "stable-diffusion-v1/lora", "epsilon"),
    ("tiny-sd2-v", "sd2-v", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v"),
    ("tiny-sdxl", "sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "epsilon"),
])
def test_family_detected_and_recorded(style_dir, tmp_path, spec, key, version, arch, pred):
    from stylelora.training import train

    assert load_base(spec).family.key == key
    out = train(config(style_dir, tmp_path / f"{spec}.safetensors", spec))
    md = read_metadata(out)
    assert md["ss_base_model_version"] == version
    assert md["modelspec.architecture"] == arch
    assert md["modelspec.prediction_type"] == pred
    assert md["ss_v2"] == str(key.startswith("sd2"))


def test_v_prediction_training_targets_velocity(style_dir, tmp_path, monkeypatch):
    import stylelora.training as T

    seen = []
    real = T.loss_target

    def spy(sched, prediction_type, latents, noise, t):
        target = real(sched, prediction_type, latents, noise, t)
        # v = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0, straight from the schedule
        ab = sched.alphas_cumprod.to(latents.device)[t].float().view(-1, 1, 1, 1)
        v = ab.sqrt() * noise - (1 - ab).sqrt() * latents
        seen.append((prediction_type, torch.allclose(target, v, atol=1e-5), torch.allclose(target, noise)))
        return target

    monkeypatch.setattr(T, "loss_target", spy)
    T.train(config(style_dir, tmp_path / "v.safetensors", "tiny-sd2-v"))
    assert seen and all(p == "v_prediction" and is_v and not is_eps for p, is_v, is_eps in seen)


def test_zero_terminal_snr_requires_v_and_rescales(style_dir, tmp_path):
    from stylelora.training import make_noise_scheduler

    pipe = load_base("tiny-sd2-v").pipe
    sched = make_noise_scheduler(pipe, "v_prediction", True)
    assert float(sched.alphas_cumprod[-1]) < 1e-6  # terminal SNR ~ 0
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(ConfigError, match="v-prediction"):
        make_noise_scheduler(load_base("tiny-random").pipe, "epsilon", True)


def test_sdxl_micro_conditioning_uses_real_sizes_and_crops(tmp_path):
    from PIL import Image

    from stylelora.data import scan_folder
    from stylelora.dataset import TrainingSet

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (300, 130), "red").save(folder / "wide.png")  # 300x130 -> cropped into a 2:1-ish bucket
    Image.new("RGB", (128, 128), "blue").save(folder / "square.png")
    base = load_base("tiny-sdxl")
    items = scan_folder(folder, trigger="t")
    ts = TrainingSet(items, DataConfig(folder=str(folder), resolution=128), base.pipe, cache_root=tmp_path / "c",
                     cache_text=True, device=torch.device("cpu"), weight_dtype=torch.float32)
    ts.prepare()
    by_name = {it.path.name: i for i, it in enumerate(items)}
    wide = ts.batch([by_name["wide.png"]], torch.Generator().manual_seed(0))  # a batch is always one bucket
    square = ts.batch([by_name["square.png"]], torch.Generator().manual_seed(0))
    assert wide["original_sizes"][0].tolist() == [130, 300]  # (height, width) of the file
    bucket = ts.buckets[by_name["wide.png"]]
    assert wide["target_sizes"][0].tolist() == [bucket.height, bucket.width] and bucket.width > bucket.height
    assert wide["latents"].shape[-2:] == (bucket.height // 8, bucket.width // 8)
    assert square["crops"][0].tolist() == [0, 0]
    text = ts.cached_text([0])
    assert text["hidden"].shape[-1] == 64 and text["pooled"].shape[-1] == 32  # both encoders + pooled


def test_nan_latent_is_an_error_naming_the_image(style_dir, tmp_path, monkeypatch):
    from stylelora.data import scan_folder
    from stylelora.dataset import TrainingSet

    base = load_base("tiny-random")
    real = base.pipe.vae.encode

    def nan_encode(x):
        out = real(x)
        out.latent_dist.mean.fill_(float("nan"))
        return out

    monkeypatch.setattr(base.pipe.vae, "encode", nan_encode)
    ts = TrainingSet(scan_folder(style_dir, trigger="t"), DataConfig(folder=str(style_dir), resolution=128), base.pipe,
                     cache_root=tmp_path / "c", cache_text=True, device=torch.device("cpu"), weight_dtype=torch.float32)
    with pytest.raises(DataError, match=r"NaN.*img0\.png"):
        ts.prepare()


def test_sdxl_adapter_loads_in_diffusers_with_ldm_keys(style_dir, tmp_path):
    from stylelora.training import train

    cfg = config(style_dir, tmp_path / "xl.safetensors", "tiny-sdxl")
    cfg.optim.lr = 5e-2  # visible effect after two steps
    out = train(cfg)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    prefixes = {k.split(".")[0].split("_")[0] + "_" + k.split("_")[1] for k in keys}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert any("input_blocks_4_1_transformer_blocks" in k for k in keys)  # ldm (sgm) names, as kohya writes
    assert not any("down_blocks" in k for k in keys)  # never both naming styles in one file

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(3)
        return pipe("zzstyle, a red circle", num_inference_steps=3, height=128, width=128, generator=g,
                    output_type="np").images[0]

    plain = render(load_base("tiny-sdxl").pipe)
    ours = load_base("tiny-sdxl").pipe
    lora.attach(ours, load_adapter(out, pipe=ours), "xl")
    theirs = load_base("tiny-sdxl").pipe
    theirs.load_lora_weights(str(out))
    a, b = render(ours), render(theirs)
    assert np.abs(a - b).max() <= 1 / 255
    assert np.abs(a - plain).max() > 2 / 255  # the adapter (UNet and both encoders) changed the image
