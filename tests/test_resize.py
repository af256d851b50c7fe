"""resize: full rank is exact, rank k is the best rank-k approximation (direct SVD of the formed ΔW), the rules pick
the documented k, a global budget is never exceeded, diffusers loads the result with the images our blend gives,
--max-error holds on a UNet output computed by hand, bad parameters are clear errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import ours_and_diffusers, render
from safetensors import safe_open

from stylelora.adapter import Adapter, LoraModule, TokenEmbedding
from stylelora.cli import main
from stylelora.errors import ConfigError
from stylelora.formats import load_adapter, save_adapter
from stylelora.models import load_base
from stylelora.resize import PROMPTS, build, global_order, ranks_for_count, resize, spectrum

UNET_T = ("to_q", "to_k", "to_v", "to_out.0")
TE_T = ("q_proj", "k_proj", "v_proj", "out_proj")  # diffusers cannot read a kohya TE LoRA without out_proj
CONV = ("down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.0.conv2")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-random")


def random_adapter(pipe, *, seed=0, embeddings=False) -> Adapter:
    """Linear modules in UNet and text encoder with mixed ranks/alphas, two conv (LoCon) modules; decaying spectra
    (columns scaled by 1/(i+1)) so the rules have something to choose between."""
    g = torch.Generator().manual_seed(seed)
    mods: dict = {"unet": {}, "text_encoder": {}}
    for comp, model, targets in (("unet", pipe.unet, UNET_T), ("text_encoder", pipe.text_encoder, TE_T)):
        for i, (name, m) in enumerate(n_m for n_m in model.named_modules()
                                      if isinstance(n_m[1], torch.nn.Linear) and n_m[0].endswith(targets)):
            r = (4, 6, 8)[i % 3]
            decay = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
            mods[comp][name] = LoraModule(torch.randn(r, m.in_features, generator=g) * 0.3,
                                          torch.randn(m.out_features, r, generator=g) * 0.3 * decay, float(r // 2))
    for name in CONV:
        conv = pipe.unet.get_submodule(name)
        r = 5
        mods["unet"][name] = LoraModule(torch.randn(r, conv.in_channels, 3, 3, generator=g) * 0.1,
                                        torch.randn(conv.out_channels, r, 1, 1, generator=g) * 0.1, 3.0)
    embs = {}
    if embeddings:
        width = pipe.text_encoder.config.hidden_size
        embs = {"zqstyle": TokenEmbedding("zqstyle", {"text_encoder": torch.randn(2, width, generator=g)})}
    return Adapter(mods, family="sd1", name="style", embeddings=embs)


def formed(m: LoraModule) -> torch.Tensor:
    """ΔW written out here: (alpha / rank) · up · down, flattened to 2-D, in float64."""
    r = m.down.shape[0]
    return (m.alpha / r) * (m.up.double().reshape(m.up.shape[0], r) @ m.down.double().reshape(r, -1))


def modules(adapter: Adapter):
    return [((c, p), m) for c in adapter.modules for p, m in adapter.modules[c].items()]


# ---------------------------------------------------------------------------------------------- the math
def test_full_rank_is_exact(base):
    a = random_adapter(base.pipe)
    out = resize(a, rank=64).adapter
    # one alpha for the file, the most common rank (ranks 4/6/8 here: 6 is the most common); the scale is folded in
    ranks = [m.rank for _, m in modules(a)]
    assert {m.alpha for _, m in modules(out)} == {float(max(set(ranks), key=lambda r: (ranks.count(r), r)))}
    for key, m in modules(a):
        new = out.modules[key[0]][key[1]]
        assert new.rank == m.rank
        assert new.down.shape[1:] == m.down.shape[1:] and new.up.shape[2:] == m.up.shape[2:]  # conv stays conv
        assert torch.allclose(formed(new), formed(m), atol=1e-6, rtol=1e-4), key


def test_rank_k_is_the_best_rank_k_approximation(base):
    a = random_adapter(base.pipe, seed=1)
    k = 3
    out = resize(a, rank=k).adapter
    for key, m in modules(a):
        u, s, vh = torch.linalg.svd(formed(m), full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        new = out.modules[key[0]][key[1]]
        assert new.rank == k and new.alpha == k  # equal ranks: alpha = rank, scale 1
        assert torch.allclose(formed(new), best, atol=1e-6, rtol=1e-4), key


def smallest_k(values: list[float], share: float) -> int:
    total, run = sum(values), 0.0
    for i, v in enumerate(values, 1):
        run += v
        if run >= share * total - 1e-12 * total:
            return i
    return len(values)


def test_rules_pick_the_documented_k(base):
    a = random_adapter(base.pipe, seed=2)
    sv = {key: torch.linalg.svdvals(formed(m))[:m.rank].tolist() for key, m in modules(a)}
    for kwargs, rule in (
        ({"energy": 0.9}, lambda s: smallest_k([x * x for x in s], 0.81)),
        ({"energy": 1.0}, lambda s: len(s)),
        ({"cumulative": 0.7}, lambda s: smallest_k(s, 0.7)),
        ({"ratio": 3.0}, lambda s: sum(x > s[0] / 3.0 for x in s)),
        ({"energy": 0.99, "max_rank": 3}, lambda s: min(3, smallest_k([x * x for x in s], 0.99 ** 2))),
    ):
        result = resize(a, **kwargs)
        got = {key: result.adapter.modules[key[0]][key[1]].rank for key in sv}
        assert got == {key: rule(s) for key, s in sv.items()}, kwargs
        assert len(set(got.values())) > 1 or kwargs == {"energy": 1.0} or "max_rank" in kwargs
    # energy 0.9 keeps at least 81 % of every module's Σσ² (so of each part's too)
    kept = resize(a, energy=0.9).energy
    assert all(v >= 0.81 for v in kept.values())


@pytest.mark.parametrize("budget", ["30K", "50K", 80000])
def test_global_budget_is_never_exceeded_and_is_one_threshold(base, budget):
    a = random_adapter(base.pipe, seed=3)
    limit = {"30K": 30 * 1024, "50K": 50 * 1024}.get(budget, budget)
    result = resize(a, budget=budget, max_rank=6)
    out = result.adapter
    used = sum(m.down.numel() * 4 + m.up.numel() * 4 for _, m in modules(out))
    assert used <= limit
    kept, dropped = [], []
    for key, m in modules(a):
        k = out.modules[key[0]][key[1]].rank
        assert 1 <= k <= min(6, m.rank)
        s2 = (torch.linalg.svdvals(formed(m))[:min(6, m.rank)] ** 2).tolist()
        cost = 4 * (m.up.shape[0] + m.down[0].numel())  # fp32 bytes of one more row of down and column of up
        kept += s2[1:k]  # the first rank of every module is always kept, outside the threshold
        dropped += [(v, cost) for v in s2[k:]]
    # one global threshold: every optional σ² kept is at least every σ² left out ...
    assert dropped and kept
    assert min(kept) >= max(v for v, _ in dropped) * (1 - 1e-6)
    # ... set as low as the budget allows: the next rank in line would not have fitted
    assert used + max(dropped)[1] > limit


# ---------------------------------------------------------------------------------------------- diffusers
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_resized_file_loads_in_diffusers_with_our_images(base, tmp_path, fmt):
    a = random_adapter(base.pipe, seed=4)
    src = save_adapter(a, tmp_path / f"src.{fmt}.safetensors", format=fmt, pipe=base.pipe)
    out = tmp_path / f"small.{fmt}.safetensors"
    assert main(["resize", str(src), "-o", str(out), "--energy", "0.9"]) == 0
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
    assert any(("lora_A" in k) == (fmt == "peft") for k in keys)  # the input's layout by default
    ours, theirs = ours_and_diffusers(out, base)
    plain = render(load_base("tiny-random").pipe)
    assert np.abs(theirs - ours).max() <= 2.5 / 255
    assert np.abs(theirs - plain).max() > 10 / 255  # it really applied


# ---------------------------------------------------------------------------------------------- functional check
def unet_output_by_hand(adapter: Adapter | None) -> torch.Tensor:
    """The UNet output the functional check measures, computed independently: a fresh base with ΔW added to the
    weights here, diffusers' own encode_prompt, the documented latents (seed 0, size min(sample_size, 32)) and
    timesteps (1000·(i + ½)/n)."""
    pipe = load_base("tiny-random").pipe
    with torch.no_grad():
        if adapter is not None:
            for (comp, path), m in modules(adapter):
                w = getattr(pipe, comp).get_submodule(path).weight
                w += formed(m).reshape(w.shape).to(w.dtype)
        hidden, _ = pipe.encode_prompt(list(PROMPTS), "cpu", 1, False)
        unet = pipe.unet
        size = min(int(unet.config.sample_size), 32)
        n = len(PROMPTS)
        latents = torch.randn(n, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        steps = torch.tensor([int(1000 * (i + 0.5) / n) for i in range(n)])
        return unet(latents, steps, hidden).sample


def test_max_error_is_respected_and_minimal(base):
    a = random_adapter(base.pipe, seed=5)
    eps = 0.2
    result = resize(a, max_error=eps, pipe=base)
    ref, orig, new = (unet_output_by_hand(x) for x in (None, a, result.adapter))
    measured = float((new - orig).norm() / (orig - ref).norm())
    assert measured == pytest.approx(result.error, rel=1e-3, abs=1e-5)
    assert measured <= eps
    # smaller than full rank
    assert sum(m.rank for _, m in modules(result.adapter)) < sum(m.rank for _, m in modules(a))
    # the bisection's boundary: the next higher global threshold (one optional rank fewer) misses ε
    n = result.method["optional_ranks"]
    assert n > 0
    spectra = {key: spectrum(m) for key, m in modules(a)}
    order = global_order(spectra, None)
    fewer = build(a, spectra, ranks_for_count(spectra, order, n - 1), {}).adapter
    assert float((unet_output_by_hand(fewer) - orig).norm() / (orig - ref).norm()) > eps
    assert torch.equal(base.pipe.unet.get_submodule(CONV[0]).weight,
                       load_base("tiny-random").pipe.unet.get_submodule(CONV[0]).weight)  # pipe left pristine


# ---------------------------------------------------------------------------------------------- files, CLI, errors
def test_cli_table_metadata_and_embeddings(base, tmp_path, capsys):
    a = random_adapter(base.pipe, seed=6, embeddings=True)
    src = save_adapter(a, tmp_path / "src.safetensors", pipe=base.pipe)
    out = tmp_path / "out.safetensors"
    assert main(["resize", str(src), "-o", str(out), "--energy", "0.8", "--max-rank", "5"]) == 0
    text = capsys.readouterr().out
    assert "unet" in text and "text_encoder" in text and "energy" in text and "KiB" in text
    with safe_open(out, "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "dynamic"
    record = json.loads(md["stylelora.resize"])
    assert record["method"] == {"energy": 0.8, "max_rank": 5}
    assert record["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    got = load_adapter(out, pipe=base.pipe)
    assert torch.equal(got.embeddings["zqstyle"].vectors["text_encoder"],
                       a.embeddings["zqstyle"].vectors["text_encoder"])
    assert max(m.rank for _, m in modules(got)) <= 5
    assert len({m.alpha for _, m in modules(got)}) == 1 and md["ss_network_alpha"] == str(modules(got)[0][1].alpha)
    # inspect shows the rank distribution per part
    assert main(["inspect", str(out), "--json", "--no-hash"]) == 0
    info = json.loads(capsys.readouterr().out)
    unet_ranks = sorted(m.rank for m in got.modules["unet"].values())
    c = info["components"]["unet"]
    assert (c["ranks"][0], c["rank_median"], c["ranks"][-1]) == (unet_ranks[0], float(np.median(unet_ranks)),
                                                                unet_ranks[-1])
    assert main(["inspect", str(out), "--no-hash"]) == 0
    assert f"{unet_ranks[0]}/{float(np.median(unet_ranks)):g}/{unet_ranks[-1]} (min/median/max)" in \
        capsys.readouterr().out
    # the input is never the output, and an existing output needs --overwrite
    assert main(["resize", str(src), "-o", str(src), "--rank", "2"]) == 2
    assert main(["resize", str(src), "-o", str(out), "--rank", "2"]) == 2
    assert main(["resize", str(src), "-o", str(out), "--rank", "2", "--overwrite"]) == 0


@pytest.mark.parametrize("kwargs, words", [
    ({"energy": 0.0}, "(0, 1]"), ({"energy": 1.5}, "(0, 1]"), ({"cumulative": -0.1}, "(0, 1]"),
    ({"rank": 0}, ">= 1"), ({"rank": -3}, ">= 1"), ({"ratio": 0.5}, ">= 1"), ({"energy": 0.9, "max_rank": 0}, ">= 1"),
    ({}, "needs a rule"), ({"rank": 2, "energy": 0.9}, "one rule"), ({"budget": "12Q"}, "size in bytes"),
    ({"budget": "0"}, "positive"), ({"budget": 100}, "too small: one rank per module"),
    ({"max_error": 0.1}, "needs --base"),
])
def test_bad_parameters_are_clear_errors(base, kwargs, words):
    a = random_adapter(base.pipe, seed=7)
    with pytest.raises(ConfigError, match=None) as info:
        resize(a, **kwargs)
    assert words in str(info.value)


def test_cli_bad_parameter_message(base, tmp_path, capsys):
    src = save_adapter(random_adapter(base.pipe), tmp_path / "src.safetensors", pipe=base.pipe)
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--energy", "1.5"]) == 2
    assert "--energy must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_budget_and_max_error_with_base(base, tmp_path, capsys):
    a = random_adapter(base.pipe, seed=8)
    src = save_adapter(a, tmp_path / "src.safetensors", pipe=base.pipe)
    out = tmp_path / "b.safetensors"
    assert main(["resize", str(src), "-o", str(out), "--budget", "40K", "--base", "tiny-random"]) == 0
    text = capsys.readouterr().out
    assert "UNet output relative error vs the original" in text
    got = load_adapter(out, pipe=base.pipe)
    assert sum(m.down.numel() * 4 + m.up.numel() * 4 for _, m in modules(got)) <= 40 * 1024
    out2 = tmp_path / "e.safetensors"
    assert main(["resize", str(src), "-o", str(out2), "--max-error", "0.25", "--base", "tiny-random"]) == 0
    with safe_open(out2, "pt") as f:
        record = json.loads(f.metadata()["stylelora.resize"])
    assert record["unet_relative_error"] <= 0.25 and record["method"]["max_error"] == 0.25
