"""train() hooks used by the web UI: progress reports and a cooperative stop that leaves a resumable checkpoint."""

from __future__ import annotations

import pytest
import torch
from test_train import quick_config

from stylelora.errors import TrainingCancelled
from stylelora.models import load_base
from stylelora.training import train


def test_progress_and_stop_then_resume(style_dir, tmp_path):
    base = load_base("tiny-random")
    before = {k: v.clone() for k, v in base.pipe.unet.state_dict().items()}
    events = []
    cfg = quick_config(style_dir, tmp_path / "w.safetensors", steps=6, log_every=1, sample_every=2,
                       sample_prompts=["zzstyle"], sample_steps=2)
    polls = []

    def should_stop():  # polled once per step: ask to stop on the third
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(TrainingCancelled, match="step 3"):
        train(cfg, base=base, progress=events.append, should_stop=should_stop)
    losses = [e for e in events if e.get("loss") is not None]
    assert [e["step"] for e in losses] == [1, 2, 3] and all(e["steps"] == 6 for e in losses)
    assert any(e.get("sample") for e in events)  # the step-2 sample was reported with its file
    assert (tmp_path / "w-checkpoints" / "step-000003" / "state.json").exists()
    # the borrowed base is back to its original modules and weights
    after = base.pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    cfg.run.resume = "latest"
    assert train(cfg, base=base).exists()


def test_borrowed_base_is_given_back_after_a_failed_run(style_dir, tmp_path, monkeypatch):
    import stylelora.training as T
    from stylelora.errors import TrainingError

    base = load_base("tiny-random")
    before = {k: v.clone() for k, v in base.pipe.unet.state_dict().items()}
    monkeypatch.setattr(T, "compute_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="NaN"):
        train(quick_config(style_dir, tmp_path / "f.safetensors", log_every=1), base=base)
    after = base.pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    monkeypatch.undo()
    assert train(quick_config(style_dir, tmp_path / "g.safetensors"), base=base).exists()  # base usable again
