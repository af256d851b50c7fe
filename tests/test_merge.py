"""merge: exact merge == blending the sources; SVD at full rank == exact; energy; metadata; CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_blend import one_thread  # noqa: F401 - autouse fixture: one torch thread
from test_blend import random_adapter, three_adapters

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
