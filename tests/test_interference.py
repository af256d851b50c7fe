"""blend-report: the overlap figures computed from the low-rank factors equal a dense computation on ΔW, an adapter
against itself overlaps fully, orthogonal-slot adapters do not, and the CLI writes the table, JSON and the
weight-sweep grid (with the toy classifier's rates on the tiny base)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from test_blend import random_adapter

from stylelora.adapter import Adapter, LoraModule
from stylelora.cli import main
from stylelora.errors import ConfigError
from stylelora.formats import save_adapter
from stylelora.interference import block_of, compare, module_stats, report
from stylelora.orthogonal import slot_rows


def dense(a, b) -> dict:
    """The figures from the dense ΔW (fp64): the definitions in stylelora/interference.py, written out."""
    wa, wb = (m.delta(torch.float64).flatten(1) if isinstance(m, LoraModule) else
              m.base_delta(torch.float64).flatten(1) for m in (a, b))
    fro = torch.linalg.matrix_norm
    return {"cosine": float((wa * wb).sum() / (wa.norm() * wb.norm())),
            "input": float(fro(wa @ wb.T) / (fro(wa.T @ wa) * fro(wb.T @ wb)).sqrt()),
            "output": float(fro(wa.T @ wb) / (fro(wa @ wa.T) * fro(wb @ wb.T)).sqrt()),
            "w": float(wa.norm() * wb.norm()), "dot": float((wa * wb).sum()),
            "sq_a": float(wa.norm() ** 2), "sq_b": float(wb.norm() ** 2)}


def lora(out, inp, rank, seed, *, conv=False, alpha=None) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, inp, 3, 3, generator=g) if conv else torch.randn(rank, inp, generator=g)
    up = torch.randn(out, rank, 1, 1, generator=g) if conv else torch.randn(out, rank, generator=g)
    return LoraModule(down=down, up=up, alpha=float(alpha or rank))


@pytest.mark.parametrize("conv", [False, True])
def test_module_figures_equal_dense_computation(conv):
    # different ranks and alphas, correlated factors (b shares half of a's rows) so every figure is far from 0 and 1
    a = lora(24, 16, 4, 0, conv=conv, alpha=2.0)
    b = lora(24, 16, 6, 1, conv=conv, alpha=3.0)
    b.down[:2] = a.down[:2]
    b.up[:, :2] = a.up[:, :2]
    got, want = module_stats(a, b).figures(), dense(a, b)
    for key in ("cosine", "input", "output"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
        assert 0.05 < abs(got[key]) < 0.95, key
    assert got["norm_a"] == pytest.approx(math.sqrt(want["sq_a"]), rel=1e-9)


def test_lycoris_module_is_compared_through_its_dense_update():
    from stylelora.adapter import LycoModule

    a = lora(24, 16, 4, 0)
    g = torch.Generator().manual_seed(9)
    full = LycoModule(kind="full", tensors={"diff": a.delta() + 0.5 * torch.randn(24, 16, generator=g)},
                      alpha=None, shape=(24, 16))
    got, want = module_stats(full, a).figures(), dense(full, a)
    for key in ("cosine", "input", "output"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_self_overlap_is_one_and_scale_invariant():
    a = lora(32, 20, 5, 3)
    scaled = LoraModule(down=a.down * 3, up=a.up, alpha=a.alpha)  # ΔW·3: the same directions
    for other in (a, scaled):
        f = module_stats(a, other).figures()
        assert f["cosine"] == pytest.approx(1.0, rel=1e-12)
        assert f["input"] == pytest.approx(1.0, rel=1e-12)
        assert f["output"] == pytest.approx(1.0, rel=1e-12)
    negated = LoraModule(down=-a.down, up=a.up, alpha=a.alpha)
    assert module_stats(a, negated).figures()["cosine"] == pytest.approx(-1.0, rel=1e-12)


def test_orthogonal_slot_rows_do_not_overlap():
    d, r = 40, 4
    a = LoraModule(down=slot_rows("unet.x", d, r, 0).float(), up=torch.randn(16, r), alpha=r)
    b = LoraModule(down=slot_rows("unet.x", d, r, 3).float(), up=torch.randn(16, r), alpha=r)
    f, want = module_stats(a, b).figures(), dense(a, b)
    assert abs(f["cosine"]) < 1e-6 and f["input"] < 1e-6 and abs(want["input"]) < 1e-6
    assert f["output"] == pytest.approx(want["output"], rel=1e-6) and f["output"] > 0.1  # outputs may share


def test_blocks_and_total_aggregate_dense_figures(tiny_base):
    a = random_adapter(tiny_base.pipe, "a", 4, 1)
    b = random_adapter(tiny_base.pipe, "b", 2, 2, unet=("to_q", "to_v"), te=("q_proj",))
    result = compare(a, b)
    rows = {}
    for comp, mods in b.modules.items():
        for path, mb in mods.items():
            rows.setdefault(block_of(comp, path), []).append(dense(a.modules[comp][path], mb))
    assert set(result["blocks"]) == set(rows) and {"unet down", "unet mid", "unet up", "text_encoder"} <= set(rows)
    everything = [x for v in rows.values() for x in v]
    for name, got in [*result["blocks"].items(), ("total", result["total"])]:
        ds = rows.get(name, everything)
        assert got["modules"] == len(ds)
        cos = sum(x["dot"] for x in ds) / math.sqrt(sum(x["sq_a"] for x in ds) * sum(x["sq_b"] for x in ds))
        assert got["cosine"] == pytest.approx(cos, rel=1e-9, abs=1e-12)
        for key in ("input", "output"):
            assert got[key] == pytest.approx(sum(x["w"] * x[key] for x in ds) / sum(x["w"] for x in ds), rel=1e-9)
    # a has modules b lacks (to_k, to_out.0 and three text-encoder projections per layer)
    assert result["only_b"] == 0 and result["only_a"] == a.num_modules() - b.num_modules()


def test_report_pairs_and_family_check(tiny_base):
    adapters = [(n, random_adapter(tiny_base.pipe, n, 2, s)) for n, s in (("x", 1), ("y", 2), ("z", 3))]
    r = report(adapters)
    assert [(p["a"], p["b"]) for p in r["pairs"]] == [("x", "y"), ("x", "z"), ("y", "z")]
    with pytest.raises(ConfigError, match="at least two"):
        report(adapters[:1])
    other = Adapter(name="xl", family="sdxl", modules={"unet": {}})
    with pytest.raises(ConfigError, match="compare adapters of one model family"):
        report([adapters[0], ("xl", other)])


def test_cli_table_json_and_sweep_grid(tiny_base, tmp_path, capsys):
    files = []
    for name, seed in (("ink", 1), ("wash", 2)):
        files.append(str(save_adapter(random_adapter(tiny_base.pipe, name, 4, seed, std=0.2),
                                      tmp_path / f"{name}.safetensors", pipe=tiny_base.pipe,
                                      metadata={"modelspec.trigger_phrase": name})))
    assert main(["blend-report", *files]) == 0
    table = capsys.readouterr().out
    assert "unet down" in table and "text_encoder" in table and "total" in table
    assert main(["blend-report", *files, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = compare(*(random_adapter(tiny_base.pipe, n, 4, s, std=0.2) for n, s in (("ink", 1), ("wash", 2))))
    assert data["pairs"][0]["total"]["input"] == pytest.approx(want["total"]["input"], rel=1e-5)
    # the sweep: 2 x 2 cells plus labels, written where --grid says
    grid = tmp_path / "sweep.png"
    assert main(["blend-report", *files, "--base", "tiny-random", "--weights", "0,1", "--steps", "1",
                 "--grid", str(grid), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["weights"] for c in data["sweep"]["cells"]] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    img = Image.open(grid)
    cell = tiny_base.pipe.unet.config.sample_size * 2 ** (len(tiny_base.pipe.vae.config.block_out_channels) - 1)
    assert img.width > 2 * cell and img.height > 2 * cell
    # bad input: clear errors, before any model is loaded
    assert main(["blend-report", files[0]]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["blend-report", *files, "--weights", "0,x"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert main(["blend-report", *files, "--classify"]) == 2
    assert "needs --base tiny" in capsys.readouterr().err
    assert main(["blend-report", *files, "--base", "tiny-random", "--grid", str(grid)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["blend-report", *files, "--base", "tiny-random", "--classify", "--grid",
                 str(tmp_path / "c.png")]) == 2
    assert "needs the toy base" in capsys.readouterr().err


def test_classify_rates_on_tiny(tmp_path):
    """Each cell's rates are the toy classifier's reading of that cell's pictures; the 0/0 cell is the base
    drawing the same prompts, classified here directly."""
    from stylelora.interference import sweep
    from stylelora.models import load_base
    from stylelora.toy import classifiers
    from stylelora.toy import world as toyworld

    base = load_base("tiny")
    adapters = []
    for style, seed in (("halftone", 1), ("stripes", 2)):
        a = random_adapter(base.pipe, style, 2, seed, std=0.05)
        a.metadata["modelspec.trigger_phrase"] = toyworld.TRIGGERS[style]
        adapters.append((style, a))
    _, cells = sweep(base, adapters, weights=[0.0, 1.0], classify=True, n=2, steps=2, seed=5)
    assert len(cells) == 4 and {"both", "halftone", "stripes", "content"} <= set(cells[0])
    scenes = toyworld.held_out_scenes(2, seed=5)
    prompts = [toyworld.captioned(s, "htone", "stripy") for s in scenes]
    base.pipe.set_progress_bar_config(disable=True)
    images = base.pipe(prompts, num_inference_steps=2, guidance_scale=5.0,
                       generator=[torch.Generator().manual_seed(5 + k) for k in range(2)]).images
    labs = classifiers.classify(classifiers.load_classifier(), images)
    assert cells[0]["halftone"] == sum("halftone" in lab["styles"] for lab in labs) / 2
    assert cells[0]["content"] == sum(lab["shape"] == s.shape and lab["colour"] == s.colour
                                      for lab, s in zip(labs, scenes)) / 2
    with pytest.raises(ConfigError, match="not an adapter of one toy style"):
        sweep(base, [adapters[0], ("plain", random_adapter(base.pipe, "p", 2, 3))], classify=True, n=1, steps=1)


def test_argument_mistakes_are_answered_before_torch(tmp_path):
    from test_cli_startup import probe

    line, err = probe("blend-report", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert line == "RC 2 TORCH False" and "a.safetensors does not exist" in err
