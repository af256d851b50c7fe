"""The web UI's Blend report tab: suggested block weights (``Studio.blend_report``), checked against
``interference.suggest_blocks`` / ``block_plan`` on the same adapters and weights, and fed back through the
Generate prompt's tag lookup."""

from __future__ import annotations

import copy
import re

import pytest

from stylelora.blend import read_adapter
from stylelora.blocks import BlockWeight, parse_blocks
from stylelora.errors import ConfigError
from stylelora.interference import block_plan, suggest_blocks
from stylelora.webui import Studio
from test_webui_handlers import make_library, random_adapter

TAG = re.compile(r"<lora:([^:>]+):([0-9.]+):lbw=([^>]+)>")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from stylelora.formats import save_adapter
    from stylelora.models import load_base

    root = tmp_path_factory.mktemp("webui-suggest")
    base = load_base("tiny-random")
    lib = make_library(base.pipe, root / "loras")
    twin = copy.deepcopy(random_adapter(base.pipe, "ink", 4, 1))  # the same factors as ink: overlap 1 everywhere
    twin.name = "twin"
    save_adapter(twin, lib / "twin.safetensors", pipe=base.pipe)
    s = Studio(base, lib, [], work_dir=root / "work")
    yield s
    s.close()


@pytest.mark.parametrize("each", [0.5, 0.8])
def test_suggested_tags_equal_suggest_blocks_and_work_in_the_prompt(studio, each):
    names = ["ink", "pastel", "twin"]
    got = studio.blend_report(names, weight_each=each)
    read = [(n, read_adapter(studio.library.path(n), pipe=studio.base.pipe)) for n in names]
    weights = {n: each for n in names}
    want = suggest_blocks(read, weights, studio.base.pipe.unet.config, threshold=0.3)
    plan = block_plan(read, weights, studio.base.pipe.unet.config, threshold=0.3)

    md = got.suggestion
    assert md.startswith("**Suggested block weights**")
    tags = TAG.findall(md)
    assert [(n, float(w)) for n, w, _ in tags] == [(n, each) for n in names]
    assert {n: parse_blocks(v) for n, _, v in tags} == want
    # ink and twin are the same update: contested blocks exist, each gets its reason line with the plan's owner
    contested = [r for r in plan["rows"] if r["contested"]]
    assert contested
    for r in contested:
        line = re.search(rf"^\s+{re.escape(r['block'])}\s+-> (\S+) \(overlap ([0-9.]+);(.*)\)$", md, re.M)
        assert line, r["block"]
        assert line.group(1) == r["owner"] and float(line.group(2)) == pytest.approx(r["overlap"], abs=0.005)
        for n, share in r["shares"].items():
            assert f"{n} {100 * share:.1f} %" in line.group(3)
    assert len(re.findall(r"-> \S+ \(overlap", md)) == len(contested)
    # the twin pair owns its contested blocks at the summed budget; someone gets 0 there
    zeroed = [n for n in names if 0.0 in want[n].values]
    assert zeroed and max(max(want[n].values) for n in names) > 1.0

    # the tags are what the Generate prompt takes: the library names, the same vectors
    parsed, clean = studio._weights({}, "a lighthouse " + " ".join(f"<lora:{n}:{w}:lbw={v}>" for n, w, v in tags))
    assert clean.strip() == "a lighthouse"
    assert set(parsed) == set(names)
    for n in names:
        assert isinstance(parsed[n], BlockWeight) and parsed[n].blocks == want[n]


def test_uncontested_blend_says_so(studio):
    read = [(n, read_adapter(studio.library.path(n), pipe=studio.base.pipe)) for n in ("ink", "pastel")]
    plan = block_plan(read, {"ink": 0.5, "pastel": 0.5}, studio.base.pipe.unet.config, threshold=1.0)
    assert not any(r["contested"] for r in plan["rows"])  # random factors never overlap fully
    got = studio.blend_report(["ink", "pastel"], threshold=1.0)
    assert "no block is contested: every multiplier is 1" in got.suggestion
    tags = TAG.findall(got.suggestion)
    assert len(tags) == 2 and all(set(parse_blocks(v).values) == {1.0} for _, _, v in tags)


@pytest.mark.parametrize("kw, words", [({"threshold": 1.5}, "threshold is 1.5; give an overlap from 0 to 1"),
                                       ({"threshold": -0.1}, "threshold is -0.1"),
                                       ({"threshold": "x"}, "must be numbers"),
                                       ({"weight_each": 0}, "weight each is 0; give a number above 0"),
                                       ({"weight_each": -1}, "weight each is -1"),
                                       ({"weight_each": float("nan")}, "weight each is nan"),
                                       ({"weight_each": None}, "must be numbers")])
def test_bad_threshold_or_weight_is_a_clear_error(studio, kw, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        studio.blend_report(["ink", "pastel"], **kw)
