"""Orthogonal slots (``train --slot K``): the frozen lora_down rows are the layer's fixed basis rows of the slot,
adapters in different slots do not overlap (A_a·A_bᵀ = 0, so ΔW_a·ΔW_bᵀ = 0), only lora_up trains, resume is
bit-exact, and the file is a plain kohya LoRA diffusers loads."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from conftest import ours_and_diffusers, render
from safetensors.torch import load_file
from test_train import quick_config, straight_and_resumed

from stylelora.cli.train import config_from_args
from stylelora.errors import ConfigError
from stylelora.formats import load_adapter
from stylelora.models import load_base
from stylelora.orthogonal import basis_rows, row_norm, slot_rows
from stylelora.training import train

RANK = 4


def slot_config(style_dir, output, slot, **over):
    cfg = quick_config(style_dir, output).replace(**{"rank": RANK, "lr": 2e-2, "train_text_encoder": True,
                                                              **over})
    if slot is not None:
        cfg.network.slot = slot
    return cfg


@pytest.fixture(scope="module")
def slotted(tmp_path_factory):
    """Two adapters trained on different images in slots 0 and 1."""
    from conftest import make_style_images

    tmp = tmp_path_factory.mktemp("slots")
    first, second = make_style_images(tmp / "s0", seed=0), make_style_images(tmp / "s1", seed=7)
    return {"a": train(slot_config(first, tmp / "a.safetensors", 0)),
            "b": train(slot_config(second, tmp / "b.safetensors", 1))}


def test_basis_rows_are_orthonormal_and_prefix_stable():
    rows = basis_rows("unet.x.to_q", 40, 12)
    torch.testing.assert_close(rows @ rows.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)
    # the rows of slot 1 are the same whether computed for slot 1 or as part of a larger draw (slot 2)
    torch.testing.assert_close(basis_rows("unet.x.to_q", 40, 8), rows[:8], rtol=0, atol=1e-12)
    torch.testing.assert_close(slot_rows("unet.x.to_q", 40, 4, 1), rows[4:8] * row_norm(), rtol=0, atol=1e-12)
    assert not torch.allclose(basis_rows("unet.x.to_k", 40, 4), rows[:4])  # another layer, another basis


def test_slot_adapters_do_not_overlap(slotted, tiny_base):
    a, b = (load_adapter(slotted[k], pipe=tiny_base.pipe) for k in ("a", "b"))
    assert set(a.modules) == {"unet", "text_encoder"}
    count = 0
    for comp, mods in a.modules.items():
        for path, ma in mods.items():
            mb = b.modules[comp][path]
            da, db = ma.down.double().flatten(1), mb.down.double().flatten(1)
            # frozen rows: orthogonal within the slot, of the kaiming-like norm, and A_a·A_bᵀ = 0 across slots
            torch.testing.assert_close(da @ da.T, torch.eye(RANK, dtype=torch.float64) * row_norm() ** 2,
                                       rtol=0, atol=1e-6)
            assert (da @ db.T).abs().max() < 1e-6, (comp, path)
            # hence the dense updates read orthogonal inputs: ΔW_a·ΔW_bᵀ = B_a·A_a·A_bᵀ·B_bᵀ = 0 and ⟨ΔW_a, ΔW_b⟩ = 0
            # (their outputs may share directions: ΔW_aᵀ·ΔW_b = A_aᵀ·B_aᵀ·B_b·A_b is not 0)
            wa, wb = ma.delta(torch.float64).flatten(1), mb.delta(torch.float64).flatten(1)
            assert (wa @ wb.T).norm() <= 1e-5 * wa.norm() * wb.norm(), (comp, path)
            assert (wa * wb).sum().abs() <= 1e-5 * wa.norm() * wb.norm(), (comp, path)
            assert ma.up.abs().max() > 1e-3 and mb.up.abs().max() > 1e-3  # lora_up trained
            count += 1
    assert count == 64
    # the UNet's rows are exactly the slot's rows of the layer's basis, seeded by "unet.<module path>"
    path, ma = next(iter(a.modules["unet"].items()))
    expected = basis_rows(f"unet.{path}", ma.down[0].numel(), 2 * RANK)[RANK:] * row_norm()
    torch.testing.assert_close(b.modules["unet"][path].down.double().flatten(1), expected, rtol=0, atol=1e-6)


def test_blend_report_sees_no_overlap_between_slots(slotted, tiny_base):
    from stylelora.interference import compare

    a, b = (load_adapter(slotted[k], pipe=tiny_base.pipe) for k in ("a", "b"))
    between, itself = compare(a, b), compare(a, a)
    for name, f in [*between["blocks"].items(), ("total", between["total"])]:
        assert abs(f["cosine"]) < 1e-5 and f["input"] < 1e-5, name
    assert itself["total"]["input"] == pytest.approx(1.0) and itself["total"]["cosine"] == pytest.approx(1.0)


def test_slot_file_loads_in_diffusers(slotted):
    base = load_base("tiny-random")
    plain = render(base.pipe)
    ours, theirs = ours_and_diffusers(slotted["b"], base)
    assert np.abs(theirs - ours).max() <= 2.5 / 255
    assert np.abs(theirs - plain).max() > 1e-3


def test_slot_resume_equals_uninterrupted(style_dir, tmp_path):
    def config(name):
        cfg = slot_config(style_dir, tmp_path / name / "x.safetensors", 2, train_text_encoder=False)
        cfg.data.cache_dir = str(tmp_path / "cache")
        return cfg

    straight, resumed = straight_and_resumed(config, stop_after=1)
    ta, tb = load_file(str(straight)), load_file(str(resumed))
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_slot_flag_and_clear_errors(style_dir, tmp_path):
    args = argparse.Namespace(config=None, recipe=None, folder=str(style_dir), slot=3)
    assert config_from_args(args).network.slot == 3
    with pytest.raises(ConfigError, match="slot needs network lora"):
        quick_config(style_dir, tmp_path / "x.safetensors").replace(network="adalora", slot=0)
    with pytest.raises(ConfigError, match="slot must be in 0..1023"):
        quick_config(style_dir, tmp_path / "x.safetensors").replace(slot=-1)
    # tiny-random's layers have 32 inputs: 8 slots at rank 4; slot 8 does not fit and the error names a layer
    with pytest.raises(ConfigError, match=r"slot 8 at rank 4 needs 36 input dimensions, but layer unet\.\S+ has 32 "
                                          r"\(it fits slots 0\.\.7"):
        train(quick_config(style_dir, tmp_path / "y.safetensors").replace(rank=4, slot=8))


def test_slot_with_learnt_tokens_trains_both(style_dir, tmp_path):
    out = train(quick_config(style_dir, tmp_path / "t.safetensors").replace(rank=RANK, slot=1, train_tokens=1,
                                                                             lr=2e-2))
    adapter = load_adapter(out, pipe=load_base("tiny-random").pipe)
    assert "zzstyle" in adapter.embeddings
    path, m = next(iter(adapter.modules["unet"].items()))
    expected = basis_rows(f"unet.{path}", m.down[0].numel(), 2 * RANK)[RANK:] * row_norm()
    torch.testing.assert_close(m.down.double().flatten(1), expected, rtol=0, atol=1e-6)
