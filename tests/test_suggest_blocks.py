"""Block weights chosen by the blend report (``interference.suggest_blocks``, ``blend-report --suggest-blocks``;
issue #17): checked against a dense re-computation of the rule (ΔW built from the factors, the overlap and energy
shares written out from their definitions), and through the Blender: the suggested vectors applied to two identical
adapters give each layer W₀ + (Σw)·ΔW_owner."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from test_blend import one_thread  # noqa: F401 - autouse fixture: one torch thread
from test_blend import quiet, random_adapter

from stylelora.adapter import Adapter
from stylelora.blend import Blender, read_adapter
from stylelora.blocks import BLOCKS_17, BLOCKS_26, BlockWeight, block_of, parse_blocks
from stylelora.cli import main
from stylelora.errors import ConfigError
from stylelora.formats import save_adapter
from stylelora.interference import block_plan, suggest_blocks
from stylelora.models import load_base


@pytest.fixture(scope="module")
def tiny():
    base = load_base("tiny-random")
    quiet(base.pipe)
    return base


def only(adapter: Adapter, keep, name: str | None = None) -> Adapter:
    """A copy of ``adapter`` (renamed) with the modules whose A1111 block is in ``keep``."""
    out = copy.deepcopy(adapter)
    out.name = name or adapter.name
    out.modules = {c: {p: m for p, m in mods.items() if keep(c, p)} for c, mods in out.modules.items()}
    out.modules = {c: mods for c, mods in out.modules.items() if mods}
    return out


def in_blocks(config, blocks):
    return lambda comp, path: block_of(comp, path, config) in blocks


def dense_delta(m) -> torch.Tensor:
    return (m.scale * m.up.double().flatten(1) @ m.down.double().flatten(1))


def reference_plan(adapters, weights, config, threshold, metric="input"):
    """The rule of ``suggest_blocks`` from dense ΔW: {label: {block: multiplier}} for the blocks it changes."""
    fro = torch.linalg.matrix_norm
    deltas = {label: {(c, p): dense_delta(m) for c, mods in a.modules.items() for p, m in mods.items()}
              for label, a in adapters}
    blocks = {key: block_of(key[0], key[1], config) for d in deltas.values() for key in d}
    out = {label: {} for label, _ in adapters}
    for block in {b for b in blocks.values() if b is not None}:
        present = [label for label, _ in adapters if any(blocks[k] == block for k in deltas[label])]
        shares = {label: sum(float(d.norm() ** 2) for k, d in deltas[label].items() if blocks[k] == block)
                  / sum(float(d.norm() ** 2) for d in deltas[label].values()) for label in present}
        overlaps = []
        for i, la in enumerate(present):
            for lb in present[i + 1:]:
                shared = [k for k in deltas[la] if k in deltas[lb] and blocks[k] == block]
                if not shared:
                    continue
                num = den = 0.0
                for k in shared:
                    wa, wb = deltas[la][k], deltas[lb][k]
                    w = float(wa.norm() * wb.norm())
                    if metric == "input":
                        f = fro(wa @ wb.T) / (fro(wa.T @ wa) * fro(wb.T @ wb)).sqrt()
                    else:
                        f = fro(wa.T @ wb) / (fro(wa @ wa.T) * fro(wb @ wb.T)).sqrt()
                    num, den = num + w * float(f), den + w
                overlaps.append(num / den)
        if overlaps and max(overlaps) >= threshold:
            owner = max(present, key=lambda label: shares[label])
            for label in present:
                out[label][block] = sum(weights[x] for x in present) / weights[owner] if label == owner else 0.0
    return out


def test_disjoint_adapters_get_all_ones(tiny):
    config = tiny.pipe.unet.config
    full = random_adapter(tiny.pipe, "ink", 4, 1)
    down = only(full, in_blocks(config, {"BASE", "IN01", "IN03", "M00"}), "down")
    up = only(random_adapter(tiny.pipe, "wash", 2, 2), in_blocks(config, {"OUT00", "OUT01", "OUT02", "OUT03"}), "up")
    assert down.modules["unet"] and up.modules["unet"] and "text_encoder" not in up.modules
    plan = block_plan([("down", down), ("up", up)], {"down": 0.5, "up": 0.5}, config, threshold=0.0)
    # tiny-random has modules in IN03 and OUT00-OUT02, which the 17 do not list: 26 values, or they would get 0
    assert plan["length"] == 26
    assert plan["blocks"]["down"].values == (1.0,) * 26 and plan["blocks"]["up"].values == (1.0,) * 26
    assert [r["block"] for r in plan["rows"]] == ["BASE", "IN01", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"]
    assert all(r["overlap"] is None and not r["contested"] and r["owner"] is None for r in plan["rows"])


def test_identical_adapters_give_the_owner_the_summed_weight(tiny):
    """Every block holds modules of both and overlaps fully: the first (equal shares) gets Σw/w_a, the other 0; the
    fused layers are W₀ + (w_a + w_b)·ΔW_a, computed here from the factors."""
    config = tiny.pipe.unet.config
    a = random_adapter(tiny.pipe, "a", 4, 7)
    b = copy.deepcopy(a)
    b.name = "b"
    weights = {"a": 0.3, "b": 0.5}
    plan = block_plan([("a", a), ("b", b)], weights, config)
    used = {block_of(c, p, config) for c, mods in a.modules.items() for p in mods}
    assert used == {"BASE", "IN01", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"}
    assert all(r["contested"] and r["owner"] == "a" and r["overlap"] == pytest.approx(1.0) for r in plan["rows"])
    va, vb = plan["blocks"]["a"], plan["blocks"]["b"]
    assert va.ids == BLOCKS_26
    for block, x, y in zip(BLOCKS_26, va.values, vb.values):
        assert (x, y) == ((pytest.approx(0.8 / 0.3), 0.0) if block in used else (1.0, 1.0)), block
    assert suggest_blocks([("a", a), ("b", b)], weights, config) == plan["blocks"]

    blender = Blender(tiny)
    blender.load(a)
    blender.load(b)
    pristine = {key: t.layer.weight.detach().clone() for key, t in blender._targets.items()}
    try:
        blender.set({"a": BlockWeight(weights["a"], va), "b": BlockWeight(weights["b"], vb)})
        assert set(blender._targets) == {(c, p) for c, mods in a.modules.items() for p in mods}
        for (comp, path), t in blender._targets.items():
            want = pristine[(comp, path)].double() + 0.8 * dense_delta(a.modules[comp][path])
            torch.testing.assert_close(t.layer.weight.double(), want, atol=1e-5, rtol=1e-5)
    finally:
        blender.reset()


def test_plan_matches_the_dense_rule_with_three_adapters(tiny):
    """ink everywhere; pastel: ink's IN01/M00 modules (M00 scaled up: a larger share there) plus its own OUT
    modules; tonly: ink's text encoder alone. Contested: IN01, M00 (pastel and ink), BASE (ink and tonly, whose
    budget leaves out pastel: no modules there); the random OUT pairs overlap ~0.2 < 0.5: not contested."""
    config = tiny.pipe.unet.config
    ink = random_adapter(tiny.pipe, "ink", 4, 1)
    pastel = only(ink, in_blocks(config, {"IN01", "M00"}), "pastel")
    for path, m in pastel.modules["unet"].items():
        if block_of("unet", path, config) == "M00":
            m.up = m.up * 3
    own = only(random_adapter(tiny.pipe, "x", 2, 2), in_blocks(config, {"OUT00", "OUT01", "OUT02", "OUT03"}))
    pastel.modules["unet"].update(own.modules["unet"])
    tonly = only(ink, lambda c, p: c == "text_encoder", "tonly")
    adapters = [("ink", ink), ("pastel", pastel), ("tonly", tonly)]
    weights = {"ink": 0.6, "pastel": 0.5, "tonly": 0.25}
    plan = block_plan(adapters, weights, config, threshold=0.5)
    want = reference_plan(adapters, weights, config, threshold=0.5)
    assert set(want["ink"]) == {"BASE", "IN01", "M00"}  # the case is what the docstring says
    assert {r["block"]: r["owner"] for r in plan["rows"] if r["contested"]} == {
        b: next(x for x in want if want[x].get(b, 1.0) not in (0.0, 1.0)) for b in ("BASE", "IN01", "M00")}
    assert plan["rows"][[r["block"] for r in plan["rows"]].index("M00")]["owner"] == "pastel"
    for label, _ in adapters:
        got = plan["blocks"][label]
        for block, v in zip(got.ids, got.values):
            assert v == pytest.approx(want[label].get(block, 1.0), rel=1e-12), (label, block)
        assert parse_blocks(got.text()).values == got.values  # the lbw= string reads back exactly
    # BASE: all of tonly's update is there (share 1): it takes ink's and its own weight; pastel has no modules there
    assert [plan["blocks"][x].values[0] for x in ("ink", "pastel", "tonly")] == [0.0, 1.0, pytest.approx(0.85 / 0.25)]
    # the output metric gives its own figures (dense reference again)
    out = block_plan(adapters, weights, config, threshold=0.5, metric="output")
    ref = reference_plan(adapters, weights, config, threshold=0.5, metric="output")
    for label, _ in adapters:
        for block, v in zip(out["blocks"][label].ids, out["blocks"][label].values):
            assert v == pytest.approx(ref[label].get(block, 1.0), rel=1e-12), (label, block)


def test_sd1_vector_when_the_17_list_every_block(tiny):
    """Modules only in blocks the 17 list (BASE, IN01, M00, OUT03 on tiny-random): the SD1 length."""
    config = tiny.pipe.unet.config
    keep = in_blocks(config, {"BASE", "IN01", "M00", "OUT03"})
    a = only(random_adapter(tiny.pipe, "a", 4, 3), keep)
    b = only(a, keep, "b")
    got = suggest_blocks([("a", a), ("b", b)], {"a": 0.5, "b": 0.5}, config)
    assert got["a"].ids == BLOCKS_17
    assert dict(zip(BLOCKS_17, got["a"].values)) == {x: 2.0 if x in ("BASE", "IN01", "M00", "OUT03") else 1.0
                                                      for x in BLOCKS_17}
    assert got["b"].values == tuple(0.0 if x in ("BASE", "IN01", "M00", "OUT03") else 1.0 for x in BLOCKS_17)
    assert parse_blocks(got["a"].text()) == got["a"]


@pytest.mark.parametrize("kwargs, words", [
    ({"adapters": 1}, "at least two adapters"),
    ({"weights": {"a": 0.0, "b": 0.5}}, "weight of 'a' is 0.0"),
    ({"weights": {"a": 0.5, "b": -1.0}}, "above 0"),
    ({"weights": {"a": 0.5}}, "no weight for 'b'"),
    ({"metric": "euclid"}, "unknown overlap metric 'euclid'.*input"),
    ({"threshold": 1.5}, "from 0 to 1"),
])
def test_bad_inputs_are_clear_errors(tiny, kwargs, words):
    a = random_adapter(tiny.pipe, "a", 2, 1)
    adapters = [("a", a), ("b", random_adapter(tiny.pipe, "b", 2, 2))][:kwargs.pop("adapters", 2)]
    args = {"weights": {"a": 0.5, "b": 0.5}, "threshold": 0.3, "metric": "input", **kwargs}
    with pytest.raises(ConfigError, match=words):
        suggest_blocks(adapters, args["weights"], tiny.pipe.unet.config, threshold=args["threshold"],
                       metric=args["metric"])


LBW = re.compile(r"<lora:(\w+):([0-9.]+):lbw=([^>]+)>")


def test_cli_prints_parseable_block_weights(tiny, tmp_path, capsys):
    ink = random_adapter(tiny.pipe, "ink", 4, 1)
    twin = copy.deepcopy(ink)
    twin.name = "twin"
    files = [str(save_adapter(a, tmp_path / f"{a.name}.safetensors", pipe=tiny.pipe)) for a in (ink, twin)]
    assert main(["blend-report", *files, "--suggest-blocks", "0.6,0.4"]) == 0
    text = capsys.readouterr().out
    read = [(f, read_adapter(f)) for f in files]
    want = suggest_blocks(read, dict(zip(files, (0.6, 0.4))), tiny.pipe.unet.config)
    tags = LBW.findall(text)
    assert [(n, float(w)) for n, w, _ in tags] == [("ink", 0.6), ("twin", 0.4)]
    assert [parse_blocks(v) for _, _, v in tags] == [want[f] for f in files]
    options = re.findall(r"--lora (\S+):([0-9.]+)@(\S+)", text)
    assert [(f, float(w), parse_blocks(v)) for f, w, v in options] == [(f, w, want[f]) for f, w in
                                                                       zip(files, (0.6, 0.4))]
    assert want[files[0]].values[0] == pytest.approx(1.0 / 0.6) and want[files[1]].values[0] == 0.0
    assert re.search(r"BASE\s+-> ink \(overlap 1\.00;", text)  # a reason line per contested block
    assert len(re.findall(r"-> ink \(overlap", text)) == 8

    assert main(["blend-report", *files, "--suggest-blocks", "--block-threshold", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["suggested_blocks"]
    assert data["weights"] == dict(zip(files, (0.5, 0.5))) and data["threshold"] == 0.5
    assert {f: parse_blocks(v) for f, v in data["lbw"].items()} == suggest_blocks(
        read, dict(zip(files, (0.5, 0.5))), tiny.pipe.unet.config, threshold=0.5)
    assert [r["owner"] for r in data["rows"]] == [files[0]] * 8

    # bad input: clear errors before torch work
    for argv, words in ((["--suggest-blocks", "0.5"], "1 weights for 2 adapter files"),
                        (["--suggest-blocks", "0.5,x"], "comma-separated weights"),
                        (["--suggest-blocks", "0.5,0"], "above 0"),
                        (["--suggest-blocks", "--block-threshold", "1.5"], "from 0 to 1")):
        assert main(["blend-report", *files, *argv]) == 2
        assert words in capsys.readouterr().err


def test_suggest_blocks_mistakes_are_answered_before_torch(tmp_path):
    from test_cli_startup import probe

    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for f in files:
        f.write_bytes(b"not read: the weights are checked first")
    line, err = probe("blend-report", *map(str, files), "--suggest-blocks", "0.5,0.5,0.5")
    assert line == "RC 2 TORCH False" and "3 weights for 2 adapter files" in err


def test_style_quality_blocks_auto_branch(tiny, tmp_path):
    """benchmarks/style_quality.py --blocks auto: a pair's Blender weights carry suggest_blocks' vectors."""
    from test_benchmarks import _script

    sq = _script("style_quality")
    ink = random_adapter(tiny.pipe, "ink", 4, 1)
    twin = copy.deepcopy(ink)
    twin.name = "twin"
    files = {a.name: save_adapter(a, tmp_path / f"{a.name}.safetensors", pipe=tiny.pipe) for a in (ink, twin)}
    weights, chosen = sq.auto_blocks("ink", "twin", files, 0.5, tiny.pipe, 0.3)
    want = suggest_blocks([(n, read_adapter(f)) for n, f in files.items()], {"ink": 0.5, "twin": 0.5},
                          tiny.pipe.unet.config)
    assert weights == {n: BlockWeight(0.5, want[n]) for n in files}
    assert {n: parse_blocks(v) for n, v in chosen.items()} == want
    assert set(want["ink"].values) == {1.0, 2.0} and set(want["twin"].values) == {0.0, 1.0}
