"""Resume == uninterrupted, bit for bit, for the settings that draw random numbers or carry state across steps.

Each case trains 4 steps straight, and 2 + 2 steps: a cooperative stop (``should_stop``) after step 2 writes a
checkpoint, ``resume="latest"`` continues it. The real-crash (SIGKILL) variant is in test_train.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train import quick_config, straight_and_resumed


CASES = {
    "grad_accum": dict(grad_accum=2),
    "text_encoder": dict(train_text_encoder=True, te_lr=5e-4),
    "caption_and_lora_dropout": dict(caption_dropout=0.5, dropout=0.3),
    "warmup": dict(warmup_steps=3, lr_scheduler="cosine"),
    "noise_offset": dict(noise_offset=0.1),
    "random_flip": dict(random_flip=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_equals_uninterrupted(style_dir, tmp_path, case):
    def config(name):
        cfg = quick_config(style_dir, tmp_path / name / "x.safetensors", steps=4).replace(lr=1e-3, **CASES[case])
        cfg.data.cache_dir = str(tmp_path / "cache")
        return cfg

    steps = {"a": [], "b": []}
    straight, resumed = straight_and_resumed(config, on_step=lambda run: lambda info: steps[run].append(
        (info.step, info.indices)))
    straight_steps, resumed_steps = steps["a"], steps["b"]
    assert resumed_steps == straight_steps  # steps 1, 2 then 3, 4 (resumed, not restarted) on the same batches
    ta, tb = load_file(str(straight)), load_file(str(resumed))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
