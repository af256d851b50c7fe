"""merge: exact merge == blending the sources; SVD at full rank == exact; energy; metadata; CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_blend import one_thread  # noqa: F401 - autouse fixture: one torch thread
from conftest import ours_and_diffusers
from test_blend import random_adapter, three_adapters

from stylelora.adapter import Adapter
from stylelora.blend import Blender
from stylelora.cli import main
from stylelora.errors import AdapterError, ConfigError
from stylelora.merge import merge
from stylelora.models import load_base

WEIGHTS = {"ink": (0.6, 0.6), "pastel": (0.4, -0.2), "tonly": (0.0, 0.9)}


@pytest.fixture(scope="module")
def pipe_and_adapters():
    base = load_base("tiny-random")
    return base, three_adapters(base.pipe)


def fused_deltas(blender: Blender) -> dict[tuple[str, str], torch.Tensor]:
    return {key: blender.delta(*key) for key in blender._targets}


def blend_of(base, items) -> dict:
    """ΔW per layer when blending ``items`` [(adapter, weight)] on ``base`` (left restored afterwards)."""
    blender = Blender(base)
    weights = {}
    for adapter, weight in items:
        weights[blender.load(adapter)] = weight
    blender.set(weights)
    out = fused_deltas(blender)
    blender.reset()
    return out


def assert_same_deltas(a: dict, b: dict, atol=1e-5):
    keys = set(a) | set(b)
    for key in keys:
        da = a.get(key, torch.zeros(()))
        db = b.get(key, torch.zeros(()))
        assert torch.allclose(da, db, atol=atol), (key, (da - db).abs().max())


def test_exact_merge_at_weight_one_equals_blend(pipe_and_adapters):
    base, adapters = pipe_and_adapters
    items = [(a, WEIGHTS[a.name]) for a in adapters]
    result = merge(items, name="blend")
    merged = result.adapter
    assert result.energy is None
    # rank = Σ ranks of the sources that hold the module with a nonzero weight
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert merged.modules["unet"][q].rank == 4 + 2 and merged.modules["unet"][k].rank == 4
    assert merged.modules["text_encoder"]["encoder.layers.0.self_attn.q_proj"].rank == 4 + 2 + 3
    m = merged.modules["unet"][q]
    assert m.alpha == m.rank
    assert_same_deltas(blend_of(base, [(merged, 1.0)]), blend_of(base, items))


def test_weight_zero_part_is_dropped(pipe_and_adapters):
    _, adapters = pipe_and_adapters
    merged = merge([(adapters[2], (0.5, 0.0)), (adapters[1], (0.0, 0.3))]).adapter
    # tonly has only TE modules (weight 0 there) and pastel's UNet weight is 0: only pastel's TE part remains
    assert merged.components() == ["text_encoder"]
    assert set(merged.modules["text_encoder"]) == set(adapters[1].modules["text_encoder"])


def test_svd_full_rank_equals_exact_and_lower_rank_reports_energy(pipe_and_adapters):
    _, adapters = pipe_and_adapters
    items = [(a, WEIGHTS[a.name]) for a in adapters]
    exact = merge(items).adapter
    full = merge(items, rank=9)
    assert set(full.energy) == {"unet", "text_encoder"}
    assert all(abs(e - 1.0) < 1e-6 for e in full.energy.values())
    for comp, mods in exact.modules.items():
        for path, m in mods.items():
            assert torch.allclose(full.adapter.modules[comp][path].delta(), m.delta(), atol=1e-5), path
    low = merge(items, rank=2)
    assert all(0.0 < e < 1.0 for e in low.energy.values())
    assert max(r for rs in low.adapter.ranks().values() for r in rs) == 2
    # the kept part is the best rank-2 approximation: its error is what the dropped singular values carry
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    d_exact, d_low = exact.modules["unet"][path].delta(), low.adapter.modules["unet"][path].delta()
    s = torch.linalg.svdvals(d_exact.double())
    assert abs(torch.linalg.norm((d_exact - d_low).double()) - s[2:].square().sum().sqrt()) < 1e-4


def test_merge_refuses_mixed_families_and_bad_rank(pipe_and_adapters):
    base, adapters = pipe_and_adapters
    other = random_adapter(base.pipe, "xl", 2, 8)
    other.family = "sdxl"
    with pytest.raises(AdapterError, match="same model family"):
        merge([(adapters[0], 1.0), (other, 1.0)])
    with pytest.raises(ConfigError, match="--rank"):
        merge([(adapters[0], 1.0)], rank=0)


def test_cli_merge_writes_sources_and_energy(pipe_and_adapters, tmp_path, capsys):
    from stylelora.formats import load_adapter, save_adapter

    base, adapters = pipe_and_adapters
    files = {a.name: save_adapter(a, tmp_path / f"{a.name}.safetensors", pipe=base.pipe) for a in adapters}
    out = tmp_path / "blend.safetensors"
    assert main(["merge", f"{files['ink']}:0.6", f"{files['pastel']}:0.4:-0.2", f"{files['tonly']}:0:0.9",
                 "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    sources = json.loads(md["modelspec.merged_from"])
    assert [s["name"] for s in sources] == ["ink", "pastel", "tonly"]
    assert sources[0]["weight"] == 0.6 and sources[1]["weight"] == {"unet": 0.4, "text_encoder": -0.2}
    for s in sources:
        with safe_open(str(files[s["name"]]), "pt") as f:
            assert s["sshs_model_hash"] == f.metadata()["sshs_model_hash"]
    merged = load_adapter(out, pipe=base.pipe)
    items = [(a, WEIGHTS[a.name]) for a in adapters]
    assert_same_deltas(blend_of(base, [(merged, 1.0)]), blend_of(base, items))

    out32 = tmp_path / "blend-r3.safetensors"
    assert main(["merge", f"{files['ink']}:0.6", f"{files['pastel']}:0.4:-0.2", "--rank", "3", "-o", str(out32)]) == 0
    printed = capsys.readouterr().out
    assert "retained energy: unet" in printed and "text_encoder" in printed and "%" in printed
    assert load_adapter(out32).ranks()["unet"] <= {1, 2, 3}  # no pipe: family and tiny layout from metadata


def test_cli_merge_unknown_file(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "missing.safetensors:0.5"), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "missing" in capsys.readouterr().err


def test_exact_merge_matches_peft_cat_combination():
    """Independent reference: PEFT's add_weighted_adapter(combination_type="cat") stacks wᵢ·(αᵢ/rᵢ)·Aᵢ and Bᵢ into
    one adapter with alpha = rank (scaling 1), so its ΔW is Σ wᵢ(αᵢ/rᵢ)BᵢAᵢ — what our exact merge must give."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer, LoraModel

    from stylelora.adapter import Adapter, LoraModule
    from stylelora.models import build_tiny_components

    unet = build_tiny_components("sd1")["unet"]
    configs = {"a": LoraConfig(r=4, lora_alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
               "b": LoraConfig(r=2, lora_alpha=3.0, target_modules=["to_q", "to_v", "proj_in"])}
    model = LoraModel(unet, configs["a"], "a")
    model.peft_config["b"] = configs["b"]
    model.inject_adapter(unet, "b")
    g = torch.Generator().manual_seed(5)
    ours = {name: Adapter(family="sd1", name=name) for name in configs}
    for path, layer in unet.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name in layer.lora_A:  # PEFT zero-initialises B: give both factors random values
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            with torch.no_grad():
                a.copy_(torch.randn(a.shape, generator=g))
                b.copy_(torch.randn(b.shape, generator=g))
            ours[name].modules.setdefault("unet", {})[path] = LoraModule(
                down=a.detach().clone(), up=b.detach().clone(), alpha=configs[name].lora_alpha)
    weights = {"a": 0.7, "b": -0.4}
    model.add_weighted_adapter(["a", "b"], [weights["a"], weights["b"]], "ab", combination_type="cat")
    merged = merge([(ours[n], w) for n, w in weights.items()]).adapter
    checked = 0
    for path, layer in unet.named_modules():
        if isinstance(layer, LoraLayer) and "ab" in layer.lora_A:
            reference = layer.get_delta_weight("ab").detach()
            mine = merged.modules["unet"][path].delta().view(reference.shape)
            assert torch.allclose(mine, reference, atol=1e-5, rtol=1e-5), (path, (mine - reference).abs().max())
            checked += 1
    assert checked == len(merged.modules["unet"]) > 0
    assert {p for a in ours.values() for p in a.modules["unet"]} == set(merged.modules["unet"])


def test_cli_merge_without_base_for_a_custom_size_model(pipe_and_adapters, tmp_path):
    """Files that only say "sd1" (no tiny-base name) of a non-SD1.5-sized model: merged from the files alone, the
    module tables coming from the files' own names and shapes. ΔW is checked against Σ wᵢ(αᵢ/rᵢ)BᵢAᵢ."""
    from stylelora.formats import load_adapter, read_metadata, save_adapter

    base, adapters = pipe_and_adapters
    files = {}
    for a in adapters[:2]:
        bare = Adapter(modules=a.modules, family="sd1", name=a.name)  # no ss_sd_model_name / stylelora.config
        files[a.name] = save_adapter(bare, tmp_path / f"{a.name}.safetensors", pipe=base.pipe)
        assert "ss_sd_model_name" not in read_metadata(files[a.name])
    out = tmp_path / "merged.safetensors"
    assert main(["merge", f"{files['ink']}:0.6", f"{files['pastel']}:-0.3", "-o", str(out)]) == 0
    merged = load_adapter(out, pipe=base.pipe)
    assert merged.family == "sd1"
    expected: dict = {}
    for a, w in ((adapters[0], 0.6), (adapters[1], -0.3)):
        for comp, mods in a.modules.items():
            for path, m in mods.items():
                term = w * (m.alpha / m.rank) * (m.up.double() @ m.down.double())
                expected[(comp, path)] = expected.get((comp, path), 0) + term
    got = {(c, p): m.delta(torch.float64) for c, mods in merged.modules.items() for p, m in mods.items()}
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert torch.allclose(got[key], want, atol=1e-5), key


def test_cli_merge_without_base_refuses_a_file_of_unknown_family(pipe_and_adapters, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from stylelora.formats import save_adapter

    base, adapters = pipe_and_adapters
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(save_adapter(adapters[0], tmp_path / "full.safetensors", pipe=base.pipe)), bare)  # no metadata
    assert main(["merge", f"{bare}:0.5", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--base" in capsys.readouterr().err


def test_merged_kohya_file_has_one_alpha_and_loads_in_diffusers_with_our_images(pipe_and_adapters, tmp_path):
    """Merged modules have different ranks; diffusers' kohya reader applies one alpha per part to SD1 UNet modules,
    so the merged file carries one alpha and folds each module's scale into its factors."""
    import numpy as np

    from stylelora.formats import save_adapter

    base, adapters = pipe_and_adapters
    items = [(a, WEIGHTS[a.name]) for a in adapters]
    merged = merge(items).adapter
    ranks = {m.rank for mods in merged.modules.values() for m in mods.values()}
    assert len(ranks) > 1 and len({m.alpha for mods in merged.modules.values() for m in mods.values()}) == 1
    assert_same_deltas(blend_of(base, [(merged, 1.0)]), blend_of(base, items))
    path = save_adapter(merged, tmp_path / "merged.safetensors", pipe=base.pipe)
    ours, theirs = ours_and_diffusers(path, load_base("tiny-random"))
    assert np.abs(ours - theirs).max() <= 2.5 / 255
