"""Run the ``stylelora`` CLI in a real process with a step callback installed (tests that need a process of their own).

    python tests/train_worker.py [--kill-after-step N] [--record DIR] [--sgd] [--per-sample-noise] -- train FOLDER ...

``--kill-after-step N``: SIGKILL this process at the end of optimizer step N, so no cleanup runs (a real crash).
``--record DIR``: write ``DIR/rank-R.json`` (the micro-batch indices of each step on process R) and
``DIR/rank-R.safetensors`` (its LoRA weights after the last step).
``--sgd``: plain SGD (the configured lr, no momentum or weight decay) instead of AdamW, so an update is linear in
the gradient and two runs with equal gradients end with equal weights.
``--stop-after-step N --stop-rank R``: process R alone asks to stop (``should_stop``) once step N is done, as a
signal delivered to one process would.
``--per-sample-noise``: each sample's latent sample, noise and timestep come from a generator seeded by its item
index, so its loss is the same whichever batch, micro-batch or process it lands in.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch


def sgd_optimizer(cfg, groups, device):
    """Stands in for ``training.make_optimizer``: SGD with each group's lr."""
    return torch.optim.SGD(groups, lr=cfg.optim.lr)


def per_sample_noise(real_compute_loss):
    """``compute_loss`` as the mean of single-sample losses, each drawn from a generator seeded by the item index."""
    def compute_loss(tset, indices, gen, *rest):
        return torch.stack([real_compute_loss(tset, [i], torch.Generator().manual_seed(10_000 + i), *rest)
                            for i in indices]).mean()
    return compute_loss


def lora_weights(models: dict) -> dict[str, torch.Tensor]:
    return {f"{comp}.{name}": p.detach().cpu().clone() for comp, m in models.items()
            for name, p in m.named_parameters() if p.requires_grad}


def main(argv: list[str]) -> int:
    sep = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-after-step", type=int)
    ap.add_argument("--record")
    ap.add_argument("--sgd", action="store_true")
    ap.add_argument("--per-sample-noise", action="store_true")
    ap.add_argument("--stop-after-step", type=int)
    ap.add_argument("--stop-rank", type=int, default=0)
    opts = ap.parse_args(argv[:sep])

    from safetensors.torch import save_file

    from stylelora import cli, training

    seen: list[list[list[int]]] = []

    def on_step(info: training.StepInfo) -> None:
        seen.append(info.indices)
        if opts.record and info.step == info.steps:
            out = Path(opts.record)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank-{info.rank}.json").write_text(json.dumps({"world": info.world, "indices": seen}))
            save_file(lora_weights(info.models), str(out / f"rank-{info.rank}.safetensors"))
        if opts.kill_after_step == info.step:
            os.kill(os.getpid(), signal.SIGKILL)

    if opts.sgd:
        training.make_optimizer = sgd_optimizer
    if opts.per_sample_noise:
        training.compute_loss = per_sample_noise(training.compute_loss)
    done = {}  # what on_step last saw on this process

    def stop_here(theirs) -> bool:
        mine = opts.stop_after_step is not None and done.get("rank") == opts.stop_rank \
            and done.get("step", 0) >= opts.stop_after_step
        return mine or bool(theirs and theirs())

    def recording(info: training.StepInfo) -> None:
        done.update(step=info.step, rank=info.rank)
        on_step(info)

    real_train = training.train

    def train(cfg, **kw):
        theirs = kw.pop("should_stop", None)
        return real_train(cfg, on_step=recording, should_stop=lambda: stop_here(theirs), **kw)

    # the CLI looks `train` up in stylelora.training when it runs, so this is the train() it calls
    training.train = train
    return cli.main(argv[sep + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
