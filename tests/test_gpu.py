"""Real CUDA checks (skipped without a GPU, see conftest): mixed-precision training keeps LoRA weights fp32, resume
equals uninterrupted on CUDA, and the fused blend on CUDA equals the CPU result."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from test_train import quick_config, straight_and_resumed

from stylelora.training import train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision,base_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_training_keeps_lora_fp32(style_dir, tmp_path, precision, base_dtype):
    """A few steps with UNet and text encoder in half precision. The LoRA weights must stay fp32 on the GPU: fp16
    ones would make the fp16 grad scaler raise "Attempting to unscale FP16 gradients." in the first step."""
    cfg = quick_config(style_dir, tmp_path / "g.safetensors", steps=3, mixed_precision=precision, log_every=1)
    cfg.network.train_text_encoder = True
    seen = {"lora": set(), "base": set(), "loss": []}

    def on_step(info):
        for m in info.models.values():
            for p in m.parameters():
                seen["lora" if p.requires_grad else "base"].add((p.dtype, p.device.type))
        seen["loss"].append(float(info.loss))

    out = train(cfg, on_step=on_step)
    assert seen["lora"] == {(torch.float32, "cuda")}
    assert (base_dtype, "cuda") in seen["base"]  # the frozen weights did run in half precision
    assert len(seen["loss"]) == 3 and all(math.isfinite(x) for x in seen["loss"]), seen["loss"]
    tensors = load_file(str(out))
    assert tensors and all(torch.isfinite(v).all() for v in tensors.values())
    assert any("lora_up" in k and v.abs().sum() > 0 for k, v in tensors.items())  # it trained


def test_resume_equals_uninterrupted_on_cuda(style_dir, tmp_path):
    """2 + 2 steps (cooperative stop, resume) against 4 straight, fp32 (TF32 matmuls). CUDA kernels (atomics in
    attention backward) need not be bitwise reproducible, so the check is a tolerance far below one AdamW step
    (~lr = 1e-3 per weight): a resume that drew different noise or lost the optimizer state differs by about that."""
    def config(name):
        cfg = quick_config(style_dir, tmp_path / name / "x.safetensors", steps=4).replace(
            lr=1e-3, noise_offset=0.05, dropout=0.1, random_flip=True)
        cfg.data.cache_dir = str(tmp_path / "cache")
        return cfg

    seen = []
    straight, resumed = straight_and_resumed(
        config, on_step=lambda run: (lambda info: seen.append(info.step)) if run == "b" else None)
    assert seen == [1, 2, 3, 4]  # the second part starts at step 3: resumed, not restarted
    ta, tb = load_file(str(straight)), load_file(str(resumed))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=2e-5, msg=k)


def test_fused_blend_on_cuda_equals_cpu():
    """Same adapters and weights blended into a CPU and a CUDA copy of the base: the fused weights agree within
    1e-5 (fp32 matmuls, TF32 off: TF32 keeps a 10-bit mantissa, ~1e-3 relative), and so do UNet outputs (1e-4)."""
    from test_blend import three_adapters

    from stylelora.blend import Blender
    from stylelora.models import load_base

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # train() may have turned it on in this process
    try:
        cpu, gpu = load_base("tiny-random"), load_base("tiny-random")
        gpu.pipe.to("cuda")
        adapters = three_adapters(cpu.pipe)
        weights = {"ink": (0.6, 0.5), "pastel": (0.4, -0.7), "tonly": (0.0, 0.8)}
        for base in (cpu, gpu):
            blender = Blender(base)
            for a in adapters:
                blender.load(a)
            blender.set(weights)
        for comp in ("unet", "text_encoder"):
            want = getattr(cpu.pipe, comp).state_dict()
            got = getattr(gpu.pipe, comp).state_dict()
            assert want.keys() == got.keys()
            for k in want:
                torch.testing.assert_close(got[k].cpu(), want[k], rtol=1e-5, atol=1e-5, msg=f"{comp}.{k}")
        x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([400])
        ids = torch.randint(0, 400, (1, 77), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            h_cpu = cpu.pipe.text_encoder(ids)[0]
            h_gpu = gpu.pipe.text_encoder(ids.cuda())[0]
            torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=1e-4, atol=1e-4)
            out_cpu = cpu.pipe.unet(x, t, h_cpu).sample
            out_gpu = gpu.pipe.unet(x.cuda(), t.cuda(), h_cpu.cuda()).sample
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
