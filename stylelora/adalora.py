"""AdaLoRA training (``--network adalora``, alias ``--rank auto``): per-module ranks chosen while training.

PEFT's AdaLoRA layers hold ΔW = P·Λ·Q · alpha/init_r (``lora_B`` = P [out, r], ``lora_E`` = Λ [r, 1], ``lora_A``
= Q [r, in·kh·kw]). Its ``RankAllocator`` scores every triplet (P column, λ, Q row) by a smoothed sensitivity
|w·∂L/∂w| and zeroes the λ of the least important ones until the total rank falls, on a cubic schedule, from
init_r per module to target_r per module on average; which modules keep rank is decided by the scores, globally.

PEFT drives the allocator from ``AdaLoraModel`` (its ``forward`` adds the orthogonal regulariser to ``outputs.loss``,
its ``update_and_allocate`` runs the schedule), but a diffusers/transformers ``add_adapter`` keeps only the layers
and drops that wrapper (PEFT issue 3373), and a UNet's output has no ``.loss`` anyway. So this module keeps its own
``RankAllocator`` over the trained components and does both by hand: ``regulariser()`` is added to the loss of each
micro-batch, ``after_step(done)`` follows ``AdaLoraModel.update_and_allocate`` after the optimizer step.

The written file is a plain kohya LoRA with per-module ranks: down = (Λ·Q)[kept], up = P[:, kept], the scale
folded into both factors and one alpha for the file (as ``resize`` does: diffusers ignores differing per-module
alphas on SD1 kohya UNet keys). A triplet is kept when its λ is not zero: a masked λ is exactly 0, so dropping it
changes nothing, and the file's ΔW equals the live model's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import lora
from .adapter import Adapter, LoraModule, common_alpha
from .errors import AdapterError, ConfigError

STATE_KEY = "adalora"  # the allocator's state inside a checkpoint's train_state.pt


def schedule(cfg) -> dict:
    """init_r, target_r, tinit, tfinal, deltaT, total_step and orth_reg_weight of a run, defaults resolved.

    Defaults: init_r = 2 × --rank (capped at 1024); tinit = 10 % of the steps (the adapter learns something before
    ranks are judged); tfinal = 20 % (the final ranks train on without pruning); deltaT from the config."""
    net, steps = cfg.network, cfg.run.steps
    target = net.rank
    init = net.init_rank if net.init_rank is not None else min(2 * target, 1024)
    tinit = net.adalora_tinit if net.adalora_tinit is not None else steps // 10
    tfinal = net.adalora_tfinal if net.adalora_tfinal is not None else steps // 5
    if init <= target:
        raise ConfigError(f"--init-rank {init} must be larger than --rank {target} (the target average rank): "
                          "AdaLoRA prunes from init_rank down to rank")
    if tinit >= steps - tfinal:
        raise ConfigError(f"AdaLoRA needs steps for pruning: --adalora-tinit {tinit} + --adalora-tfinal {tfinal} "
                          f"leave none of --steps {steps}. Lower them or raise --steps.")
    return {"init_r": init, "target_r": target, "tinit": tinit, "tfinal": tfinal, "deltaT": net.adalora_delta_t,
            "total_step": steps, "orth_reg_weight": net.orth_reg_weight}


class AdaLora:
    """AdaLoRA layers in a pipeline's trained components, with the allocator PEFT's ``add_adapter`` leaves out."""

    def __init__(self, pipe, cfg, components: list[str], adapter_name: str):
        from peft import AdaLoraConfig
        from peft.tuners.adalora import RankAllocator

        net = cfg.network
        self.adapter_name, self.components = adapter_name, list(components)
        self.sched = schedule(cfg)
        # scale = alpha / init_r; alpha defaults to init_r (scale 1), as a plain LoRA defaults to alpha = rank
        alpha = net.alpha if net.alpha is not None else float(self.sched["init_r"])
        configs = {}
        for n in self.components:
            targets = net.unet_targets if n == "unet" else net.te_targets
            configs[n] = AdaLoraConfig(lora_alpha=alpha, lora_dropout=net.dropout, target_modules=list(targets),
                                       init_lora_weights=True, **self.sched)
            try:
                getattr(pipe, n).add_adapter(configs[n], adapter_name=adapter_name)
            except ValueError as e:  # PEFT: "Target modules ... not found in the base model"
                raise AdapterError(f"cannot place AdaLoRA on {n}: {e}. Check --unet-targets/--te-targets.") from e
        # one allocator over all trained components: the rank budget is shared between UNet and text encoder
        self.model = torch.nn.ModuleDict({n: getattr(pipe, n) for n in self.components})
        self.config = configs[self.components[0]]
        self.factors = _Factors(self.model, adapter_name)
        self.allocator = RankAllocator(self.factors, self.config, adapter_name)
        self.rank_pattern: dict[str, list[bool]] = {}
        self._factors = [(p, ".lora_A." in n) for n, p in self.factors.named_parameters() if ".lora_E." not in n]

    # ------------------------------------------------------------------------------------------ training
    def regulariser(self) -> torch.Tensor:
        """orth_reg_weight × mean over factors of ‖QQᵀ − I‖_F (Q = lora_A) and ‖PᵀP − I‖_F (P = lora_B), as
        ``AdaLoraModel.forward`` adds it to ``outputs.loss``; in fp32 (outside autocast)."""
        terms = []
        for p, is_q in self._factors:
            cov = p @ p.T if is_q else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
        return self.sched["orth_reg_weight"] * torch.stack(terms).mean()

    def after_step(self, step: int) -> None:
        """``AdaLoraModel.update_and_allocate(step)``: after backward and the optimizer step, before zero_grad.
        ``step`` counts optimizer steps done (1..total_step), so the final mask is set by the last pruning step."""
        alloc, end = self.allocator, self.sched["total_step"] - self.sched["tfinal"]
        if step < end:
            _, pattern = alloc.update_and_allocate(self.factors, step)
            if pattern:
                self.rank_pattern = pattern
        elif step == end:
            _, self.rank_pattern = alloc.update_and_allocate(self.factors, step, force_mask=True)
            alloc.reset_ipt()
        else:  # the final ranks train on; the optimizer moves masked λ off zero, so mask again after each step
            alloc.mask_using_rank_pattern(self.factors, self.rank_pattern)

    def state_dict(self) -> dict:
        """What a resumed run needs to allocate exactly as an uninterrupted one: the importance averages and mask."""
        a = self.allocator
        return {"ipt": a.ipt, "exp_avg_ipt": a.exp_avg_ipt, "exp_avg_unc": a.exp_avg_unc,
                "rank_pattern": self.rank_pattern}

    def load_checkpoint(self, path: Path) -> None:
        """The allocator's state from checkpoint folder ``path`` (already checked by ``checkpoint.load``)."""
        state = torch.load(Path(path) / "train_state.pt", map_location="cpu", weights_only=True).get(STATE_KEY)
        if state is None:
            raise ConfigError(f"cannot resume from {path}: it was not written by an AdaLoRA run (--network adalora)")
        params = dict(self.model.named_parameters())
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(self.allocator, key, {n: t.to(params[n].device) for n, t in state[key].items()})
        self.rank_pattern = dict(state["rank_pattern"])

    # ------------------------------------------------------------------------------------------ export
    def extract(self, pipe) -> Adapter:
        """The live adapter as a kohya LoRA with per-module ranks; ΔW of every module is exactly the live one."""
        kept: dict[str, dict[str, tuple]] = {}
        for comp in self.components:
            for path, layer in lora.lora_layers(getattr(pipe, comp), self.adapter_name):
                name = self.adapter_name
                lam = layer.lora_E[name].detach().double().view(-1)
                idx = (lam != 0).nonzero().view(-1)
                if len(idx):
                    # scaling / (ranknum + 1e-5), evaluated as PEFT's forward does (ranknum in its own dtype)
                    scale = float(layer.scaling[name]) / float(layer.ranknum[name] + 1e-5)
                    kept.setdefault(comp, {})[path] = (layer, idx, scale)
        ranks = [len(idx) for mods in kept.values() for _, idx, _ in mods.values()]
        if not ranks:
            raise AdapterError("AdaLoRA pruned every rank of every module: nothing to write (raise --rank)")
        alpha = common_alpha(ranks)  # one alpha for the file, scales folded in (see adapter.common_alpha)
        adapter = Adapter(name=self.adapter_name)
        for comp, mods in kept.items():
            adapter.modules[comp] = {path: _module(layer, self.adapter_name, idx, scale, alpha)
                                     for path, (layer, idx, scale) in mods.items()}
        return adapter

    def metadata(self, adapter: Adapter) -> dict[str, str]:
        ranks = [m.rank for mods in adapter.modules.values() for m in mods.values()]
        md = {"stylelora.adalora": json.dumps({**self.sched, "total_rank": sum(ranks),
                                               "budget": self.sched["target_r"] * len(self._all_modules())})}
        if len(set(ranks)) > 1:
            md["ss_network_dim"] = "dynamic"  # as kohya's resize_lora.py writes mixed ranks
        return md

    def _all_modules(self) -> list[str]:
        return [f"{c}.{p}" for c in self.components for p, _ in lora.lora_layers(self.model[c], self.adapter_name)]


class _Factors:
    """The trained AdaLoRA tensors (lora_A/E/B) of the components, all that the allocator may see.

    ``RankAllocator`` picks parameters by substring ("lora_" and the adapter name in the name); our adapter name,
    "stylelora_train", contains "lora_" itself, so on the whole model it would also pick every (gradient-less)
    ``ranknum``."""

    def __init__(self, model: torch.nn.Module, adapter_name: str):
        self.model, self.suffixes = model, tuple(f".{x}.{adapter_name}" for x in ("lora_A", "lora_E", "lora_B"))

    def named_parameters(self):
        return ((n, p) for n, p in self.model.named_parameters() if n.endswith(self.suffixes))


def _module(layer, name: str, idx: torch.Tensor, scale: float, alpha: float) -> LoraModule:
    """down = √c·(Λ·Q)[idx], up = √c·P[:, idx] with c = scale·k/alpha, so (alpha/k)·up·down = scale·P·Λ·Q."""
    k = len(idx)
    q = layer.lora_A[name].detach().double()[idx]
    lam = layer.lora_E[name].detach().double()[idx]
    p = layer.lora_B[name].detach().double()[:, idx]
    root = math.sqrt(scale * k / alpha)
    shape = layer.get_base_layer().weight.shape
    down = (root * lam * q).reshape(k, *shape[1:])
    up = (root * p).reshape(shape[0], k, *([1] * (len(shape) - 2)))
    return LoraModule(down=down.float().contiguous(), up=up.float().contiguous(), alpha=alpha)
