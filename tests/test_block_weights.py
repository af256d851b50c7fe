"""Per-block weights (A1111's LoRA Block Weight): parsing, the block of each module, the fused blend, prompt tags,
the infotext round trip, merge and bake.

The reference for "which block is this module in" is independent of stylelora's own numbering: the UNet's state
dict in ldm key layout is read back by diffusers' ``convert_ldm_unet_checkpoint`` (every tensor marked with its
ldm key's index), so each diffusers module is paired with the ldm key diffusers gives it; the block is then what
the extension's rule (a substring ``diffusion_model_input_blocks_N_`` … of the key; text encoders are BASE) says.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from test_blend import one_thread  # noqa: F401 - autouse fixture: one torch thread
from test_blend import quiet, random_adapter

from stylelora.adapter import Adapter, LoraModule, LycoModule
from stylelora.blend import Blender
from stylelora.blocks import BLOCKS_12, BLOCKS_17, BLOCKS_26, PRESETS, BlockWeight, block_of, parse_blocks
from stylelora.errors import ConfigError
from stylelora.models import load_base
from stylelora.prompt import parse_prompt, parse_spec

WEIGHTS = {"ink": (0.7, 0.4), "pastel": (0.5, -0.3)}


def a1111_block(ldm_key: str) -> str | None:
    """The extension's rule (lora_block_weight.py ``ratiodealer``): the last block whose
    ``diffusion_model_<input_blocks_N|middle_block|output_blocks_N>_`` occurs in the key; None if none does."""
    flat = ldm_key.replace(".", "_")
    found = None
    for block in BLOCKS_26[1:]:
        kind = {"IN": "input_blocks_", "M0": "middle_block", "OU": "output_blocks_"}[block[:2]]
        needle = f"diffusion_model_{kind}{int(block[-2:]) if kind != 'middle_block' else ''}_"
        if needle in flat:
            found = block
    return found


def reference_blocks(unet) -> dict[str, str | None]:
    """{diffusers module path: block} through diffusers' ldm -> diffusers conversion (see the module docstring)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from stylelora.ldm import unet_to_ldm

    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    keys = list(ldm)
    marked = {k: torch.full(tuple(ldm[k].shape), float(i)) for i, k in enumerate(keys)}
    back = convert_ldm_unet_checkpoint(marked, dict(unet.config))
    out = {}
    for dkey, t in back.items():
        module = dkey.rpartition(".")[0]
        out[module] = a1111_block(keys[int(t.flatten()[0])])
    return out


def multiplier(blocks, block):
    """A1111's to26: the vector's value for a block it lists, 0 for one it does not; 1 outside every block."""
    if block is None:
        return 1.0
    return blocks.values[blocks.ids.index(block)] if block in blocks.ids else 0.0


def expected_weight(w0, adapters, weights, blocks, comp, path, block):
    """W₀ + Σ wᵢ·mᵢ·(αᵢ/rᵢ)·BᵢAᵢ in float64 from the adapters' own factors."""
    w = w0.double()
    idx = 0 if comp == "unet" else 1
    for a in adapters:
        m = a.modules.get(comp, {}).get(path)
        if m is None or a.name not in weights:
            continue
        c = weights[a.name][idx] * (multiplier(blocks[a.name], block) if a.name in blocks else 1.0)
        w = w + c * m.scale * (m.up.double() @ m.down.double())
    return w


@pytest.fixture(scope="module")
def sd1():
    base = load_base("tiny-random")
    quiet(base.pipe)
    adapters = [random_adapter(base.pipe, "ink", 4, 1), random_adapter(base.pipe, "pastel", 2, 2)]
    return base, adapters, reference_blocks(base.pipe.unet)


def layers(blender):
    return {key: t.layer.weight.detach().clone() for key, t in blender._targets.items()}


# ------------------------------------------------------------------------------------------- vectors, syntax
def test_block_of_matches_the_extension_rule(sd1):
    base, adapters, ref = sd1
    config = base.pipe.unet.config
    paths = [p for a in adapters for p in a.modules["unet"]]
    assert paths and all(block_of("unet", p, config) == ref[p] for p in paths)
    # every layer LoRA/LoCon can touch, convs and norms included
    assert all(block_of("unet", p, config) == ref[p] for p in ref)
    assert {ref[p] for p in paths} == {"IN01", "IN03", "M00", "OUT00", "OUT01", "OUT02", "OUT03"}
    assert block_of("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", config) == "BASE"


def test_presets_and_vectors():
    ins = parse_blocks("INS")
    assert ins.preset == "INS" and ins.ids == BLOCKS_17
    assert [b for b, v in zip(BLOCKS_17, ins.values) if v] == ["BASE", "IN01", "IN02", "IN04"]
    assert parse_blocks(",".join(["1", "1", "1", "1"] + ["0"] * 13)).values == ins.values
    assert parse_blocks("ALL0.5").values == (0.5,) * 17
    assert parse_blocks("NONE").values == (0.0,) * 17
    assert set(PRESETS) >= {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"}
    for n in (12, 17, 20, 26):
        values = tuple(round(0.1 * i - 0.3, 1) for i in range(n))
        b = parse_blocks(",".join(str(v) for v in values))
        assert b.values == values and len(b.ids) == n and parse_blocks(b.text()) == b
    assert parse_blocks("0.123456789," + ",".join(["1"] * 16)).values[0] == 0.123456789  # text() is exact
    assert parse_blocks(parse_blocks("0.123456789," + ",".join(["1"] * 16)).text()).values[0] == 0.123456789


@pytest.mark.parametrize("text, words", [
    ("1,0,1", ["3 values", "17"]),
    (",".join(["1"] * 16 + ["nan"]), ["value 17", "finite"]),
    (",".join(["1"] * 16 + ["inf"]), ["finite"]),
    ("FOO", ["unknown preset 'FOO'", "INS", "OUTALL", "ALL0.5"]),
    ("ins", ["case-sensitive", "'INS'"]),
    (",".join(["1"] * 8 + ["R"] * 9), ["value 9", "'R'", "random"]),
    (",".join(["U"] * 17), ["random"]),
    ("X," + ",".join(["1"] * 16), ["inherited"]),
    (",".join(["1"] * 16 + ["a"]), ["value 17", "'a'", "not a number"]),
    (",".join(["1"] * 61), ["FLUX"]),
])
def test_bad_vectors_are_clear_errors(text, words):
    with pytest.raises(ConfigError) as e:
        parse_blocks(text)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_spec_and_prompt_syntax(tmp_path):
    ref = parse_spec("ink.safetensors:0.8@INS")
    assert (ref.source, ref.unet, ref.te, ref.blocks) == ("ink.safetensors", 0.8, 0.8, PRESETS["INS"])
    vec = ",".join(["0.5"] * 12)
    ref = parse_spec(f"a/b.safetensors:0.6:0.2@{vec}")
    assert (ref.source, ref.unet, ref.te, ref.blocks.values) == ("a/b.safetensors", 0.6, 0.2, (0.5,) * 12)
    assert parse_spec("ink@OUTD").blocks == PRESETS["OUTD"] and parse_spec("ink@OUTD").unet == 1.0
    odd = tmp_path / "x@y.safetensors"  # an existing file whose name has '@'
    odd.write_bytes(b"")
    assert parse_spec(str(odd)).blocks is None and parse_spec(f"{odd}:0.5").unet == 0.5
    assert parse_spec("dir@1/ink.safetensors:0.5").blocks is None  # '@' in a folder name
    with pytest.raises(ConfigError, match="unknown preset 'BAD'"):
        parse_spec("ink.safetensors:0.5@BAD")

    clean, refs = parse_prompt("a cat <lora:ink:0.8:lbw=OUTD>, <lora:pastel:0.5:0.7:lbw=1,0,0,0,0,0,0,0,0,0,0,1>"
                               " <lora:old:0.6:MIDD> <lora:plain:0.3>")
    assert clean == "a cat"
    got = [(r.source, r.te, r.unet, r.blocks) for r in refs]
    assert got == [("ink", 0.8, 0.8, PRESETS["OUTD"]),
                   ("pastel", 0.5, 0.7, parse_blocks("1,0,0,0,0,0,0,0,0,0,0,1")),
                   ("old", 0.6, 0.6, PRESETS["MIDD"]), ("plain", 0.3, 0.3, None)]
    assert [r.tag(r.source) for r in refs[:2]] == ["<lora:ink:0.8:lbw=OUTD>",
                                                   "<lora:pastel:0.5:0.7:lbw=1,0,0,0,0,0,0,0,0,0,0,1>"]
    with pytest.raises(ConfigError, match="lbw.*5 values"):
        parse_prompt("<lora:ink:1:lbw=1,1,1,1,1>")


# ------------------------------------------------------------------------------------------- the fused blend
def test_all_ones_is_todays_blend_bit_for_bit(sd1):
    base, adapters, _ = sd1
    blender = Blender(base)
    for a in adapters:
        blender.load(a)
    blender.set(WEIGHTS)
    plain = layers(blender)
    ones = ",".join(["1"] * 26)
    blender.set({"ink": BlockWeight(WEIGHTS["ink"], ones), "pastel": (WEIGHTS["pastel"], [1.0] * 26)})
    assert blender.blocks["ink"].values == (1.0,) * 26
    now = layers(blender)
    assert all(torch.equal(now[k], plain[k]) for k in plain)
    blender.reset()
    assert all(torch.equal(t.layer.weight, t.pristine) for t in blender._targets.values())


def test_zero_block_leaves_its_layers_at_w0(sd1):
    base, adapters, ref = sd1
    blender = Blender(base)
    for a in adapters:
        blender.load(a)
    pristine = {key: t.layer.weight.detach().clone() for key, t in blender._targets.items()}
    # ink: BASE, IN01, M00 and OUT01 off, the other blocks at assorted values; pastel: the OUTD preset (17 values:
    # IN03 and OUT00-OUT02 are not listed, so they get 0 as in A1111)
    values = [0.0 if b in ("BASE", "IN01", "M00", "OUT01") else 0.3 * (i % 5) - 0.7 for i, b in enumerate(BLOCKS_26)]
    blocks = {"ink": parse_blocks(",".join(str(v) for v in values)), "pastel": PRESETS["OUTD"]}
    blender.set({"ink": (WEIGHTS["ink"], blocks["ink"]), "pastel": (WEIGHTS["pastel"], "OUTD")})
    zero = {b for b in BLOCKS_26 if multiplier(blocks["ink"], b) == 0 and multiplier(blocks["pastel"], b) == 0}
    assert zero == {"IN01", "M00", "OUT01"}
    changed = 0
    for (comp, path), w in layers(blender).items():
        block = "BASE" if comp != "unet" else ref[path]
        if block in zero:
            assert torch.equal(w, pristine[(comp, path)]), (comp, path, block)
        else:
            want = expected_weight(pristine[(comp, path)], adapters, WEIGHTS, blocks, comp, path, block)
            torch.testing.assert_close(w.double(), want, atol=1e-5, rtol=1e-5)
            changed += not torch.equal(w, pristine[(comp, path)])
    assert changed > 10
    # update() changes one adapter and keeps the other's blocks
    blender.update({"pastel": 0.0})
    assert blender.blocks == {"ink": blocks["ink"]}
    blender.reset()
    assert all(torch.equal(t.layer.weight, pristine[k]) for k, t in blender._targets.items())


def test_lycoris_module_takes_its_block_multiplier(sd1):
    """A full-difference module (LyCORIS) is scaled by its block like a LoRA pair; 0 leaves W₀ exactly."""
    base, _, ref = sd1
    unet = base.pipe.unet
    paths = [p for p in ref if p.endswith("attn1.to_q")]
    g = torch.Generator().manual_seed(5)
    diffs = {p: torch.randn(unet.get_submodule(p).weight.shape, generator=g) * 0.1 for p in paths}
    adapter = Adapter(name="full", family="sd1", metadata={"ss_sd_model_name": "tiny-random"})
    adapter.modules["unet"] = {p: LycoModule("full", {"diff": d}, None, tuple(d.shape)) for p, d in diffs.items()}
    blender = Blender(base)
    blender.load(adapter)
    pristine = {p: unet.get_submodule(p).weight.detach().clone() for p in paths}
    vec = [0.0 if b == "IN01" else 0.5 for b in BLOCKS_26]
    blender.set({"full": (0.8, vec)})
    for p in paths:
        w = unet.get_submodule(p).weight
        if ref[p] == "IN01":
            assert torch.equal(w, pristine[p])
        else:
            torch.testing.assert_close(w, pristine[p] + 0.8 * 0.5 * diffs[p])
    blender.reset()
    assert all(torch.equal(unet.get_submodule(p).weight, pristine[p]) for p in paths)


def test_blender_refuses_bad_block_weights(sd1):
    base, adapters, _ = sd1
    blender = Blender(base)
    blender.load(adapters[0])
    for bad, words in (((1.0, "FOO"), "unknown preset 'FOO'"), ((1.0, [1.0] * 5), "5 values"),
                       ((1.0, [math.nan] * 17), "finite")):
        with pytest.raises(ConfigError, match=words):
            blender.set({"ink": bad})
    assert blender.active() == {}


def test_sdxl_vector_maps_onto_tiny_sdxl(caplog):
    """The 12-value SDXL vector on tiny-sdxl (two levels: its attentions are in IN04, IN05, M00, OUT00-OUT02;
    IN07, IN08 do not exist); both text encoders are BASE."""
    base = load_base("tiny-sdxl")
    pipe = base.pipe
    ref = reference_blocks(pipe.unet)
    g = torch.Generator().manual_seed(3)
    adapter = Adapter(name="xl", family="sdxl")
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        mods = {}
        for path, m in getattr(pipe, comp).named_modules():
            if isinstance(m, torch.nn.Linear) and path.endswith(("to_q", "to_v", "q_proj", "v_proj")):
                mods[path] = LoraModule(down=torch.randn(2, m.in_features, generator=g) * 0.3,
                                        up=torch.randn(m.out_features, 2, generator=g) * 0.3, alpha=1.0)
        adapter.modules[comp] = mods
    assert {ref[p] for p in adapter.modules["unet"]} == {"IN04", "IN05", "M00", "OUT00", "OUT01", "OUT02"}
    values = [0.5, 0.0, 1.0, 7.0, 7.0, 2.0, 0.25, 0.0, 1.5, 3.0, 3.0, 3.0]  # BASE,IN04,IN05,IN07,IN08,M00,OUT00…
    blocks = parse_blocks(",".join(map(str, values)))
    assert blocks.ids == BLOCKS_12
    blender = Blender(base)
    blender.load(adapter)
    pristine = {key: t.layer.weight.detach().clone() for key, t in blender._targets.items()}
    with caplog.at_level(logging.WARNING):
        blender.set({"xl": (0.8, blocks)})
    assert "get 0" not in caplog.text  # the 12 values cover every block this adapter uses
    for (comp, path), t in blender._targets.items():
        block = "BASE" if comp != "unet" else ref[path]
        want = expected_weight(pristine[(comp, path)], [adapter], {"xl": (0.8, 0.8)}, {"xl": blocks}, comp, path,
                               block)
        if block in ("IN04", "OUT01"):
            assert torch.equal(t.layer.weight, pristine[(comp, path)])
        torch.testing.assert_close(t.layer.weight.double(), want, atol=1e-5, rtol=1e-5)
    # a 17-value (SD1) preset on SDXL zeroes OUT00-OUT02, as A1111 does: said in a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        blender.set({"xl": (0.8, "ALL")})
    assert "OUT00, OUT01, OUT02" in caplog.text and "12 or 20 values" in caplog.text
    assert all(torch.equal(blender._targets[("unet", p)].layer.weight, pristine[("unet", p)])
               for p in adapter.modules["unet"] if ref[p] in ("OUT00", "OUT01", "OUT02"))


# ------------------------------------------------------------------------------- infotext, merge and bake
@pytest.fixture(scope="module")
def files(sd1, tmp_path_factory):
    from stylelora.formats import save_adapter

    base, adapters, _ = sd1
    folder = tmp_path_factory.mktemp("loras")
    return {a.name: save_adapter(a, folder / f"{a.name}.safetensors", pipe=base.pipe) for a in adapters}


SPECS = {"ink": "0.7:0.4@OUTD", "pastel": "0.5:-0.3@0,1,1,0.5,0,0,0,2,0,0,0,1,1,1,0.5,0,0,0,0,0,1,1,1,1,1,1"}


def blended_with_blocks(files):
    """A fresh tiny-random base with the two files blended at SPECS through the Blender."""
    base = load_base("tiny-random")
    quiet(base.pipe)
    blender = Blender(base)
    blender.set(blender.load_refs([parse_spec(f"{files[n]}:{s}") for n, s in SPECS.items()]))
    return base, blender


def test_infotext_round_trip(sd1, files):
    from stylelora.generate import Settings, generate, parse_infotext

    base, blender = blended_with_blocks(files)
    # ink from a prompt tag (overrides its --lora setting), pastel from --lora: its tag is appended
    settings = Settings(prompt="a lighthouse <lora:ink:0.6:lbw=INALL>", seed=3, steps=1, width=32, height=32)
    (image,) = generate(base, settings, blender)
    text = image.info["parameters"]
    assert "<lora:ink:0.6:lbw=INALL>" in text and ":lbw=0,1,1,0.5," in text
    weights = layers(blender)
    blender.reset()

    prompt = parse_infotext(text)["Prompt"]
    again = Settings(prompt=prompt, seed=3, steps=1, width=32, height=32)
    (image2,) = generate(base, again, blender)
    assert blender.blocks == {"ink": PRESETS["INALL"], "pastel": parse_blocks(SPECS["pastel"].split("@")[1])}
    assert all(torch.equal(t, weights[k]) for k, t in layers(blender).items())
    assert image2.tobytes() == image.tobytes()


def test_merge_with_blocks_equals_blend_with_blocks(files, tmp_path, capsys):
    from stylelora.cli import main

    _, blender = blended_with_blocks(files)
    want = {k: t.layer.weight.detach().clone() for k, t in blender._targets.items()}
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *(f"{files[n]}:{s}" for n, s in SPECS.items()), "-o", str(out)]) == 0
    base = load_base("tiny-random")
    pristine = {(c, p): getattr(base.pipe, c).get_submodule(p).weight.detach().clone() for c, p in want}
    merged = Blender(base)
    merged.load(out, weight=1.0)
    got = {k: t.layer.weight.detach() for k, t in merged._targets.items()}
    assert 0 < len(got) < len(want)  # IN03: 0 in both sources' vectors, so left out of the merged file
    for key, w in want.items():
        if torch.equal(w, pristine[key]):  # every source's block multiplier is 0 there: not in the merged file
            assert key not in got
        else:
            torch.testing.assert_close(got[key], w, atol=1e-5, rtol=1e-5)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        rows = json.loads(f.metadata()["modelspec.merged_from"])
    assert [r.get("blocks") for r in rows] == [s.split("@")[1] for s in SPECS.values()]
    with pytest.raises(ConfigError, match="block weights"):
        from stylelora.merge import merge_files
        from stylelora.zipmerge import ZipOptions

        merge_files([parse_spec(f"{files['ink']}:1@INS")], tmp_path / "z.safetensors", zip=ZipOptions(),
                    pipe=base.pipe)


def test_bake_with_blocks(files, tmp_path):
    from stylelora.bake import BAKE_INFO
    from stylelora.cli import main

    base, blender = blended_with_blocks(files)
    out = tmp_path / "baked"
    loras = [a for n, s in SPECS.items() for a in ("--lora", f"{files[n]}:{s}")]
    assert main(["bake", "--base", "tiny-random", *loras, "-o", str(out)]) == 0
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    state = unet.state_dict()
    for (comp, path), t in blender._targets.items():
        if comp == "unet":
            assert torch.equal(state[f"{path}.weight"], t.layer.weight), path
    info = json.loads((out / BAKE_INFO).read_text())
    assert [a.get("blocks") for a in info["adapters"]] == [s.split("@")[1] for s in SPECS.values()]


def test_generate_cli_writes_lbw_and_refuses_bad_blocks_before_torch(files, tmp_path, capsys):
    from PIL import Image

    from stylelora.cli import main
    from test_cli_startup import probe

    out = tmp_path / "x.png"
    assert main(["generate", "a lighthouse", "--base", "tiny-random", "--lora", f"{files['ink']}:0.7@OUTD",
                 "--steps", "1", "--width", "32", "--height", "32", "--seed", "1", "--device", "cpu",
                 "-o", str(out)]) == 0
    assert "blend: ink 0.7@OUTD" in capsys.readouterr().out
    assert "<lora:ink:0.7:lbw=OUTD>" in Image.open(out).info["parameters"]
    line, err = probe("generate", "a lighthouse", "--lora", f"{files['ink']}:0.5@FOO")
    assert line == "RC 2 TORCH False" and "unknown preset 'FOO'" in err and "OUTALL" in err


def test_merge_without_base_numbers_blocks_by_the_released_layout():
    """No base: an SD1.5-sized adapter's blocks come from the released SD1.5 layout; a module of another width
    (a model of another size) is refused, asking for --base."""
    from stylelora.errors import AdapterError
    from stylelora.merge import merge

    g = torch.Generator().manual_seed(0)
    paths = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 320,  # IN01
             "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q": 320,  # OUT11
             "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 1280}  # M00
    adapter = Adapter(name="sd15", family="sd1")
    adapter.modules["unet"] = {p: LoraModule(torch.randn(1, n, generator=g), torch.randn(n, 1, generator=g), 1.0)
                               for p, n in paths.items()}
    merged = merge([(adapter, (0.5, "OUTALL"))]).adapter  # OUTALL: IN01 0, M00 0, OUT11 1
    assert list(merged.modules["unet"]) == ["up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"]
    torch.testing.assert_close(merged.modules["unet"][list(merged.modules["unet"])[0]].delta(),
                               0.5 * adapter.modules["unet"]["up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"]
                               .delta())
    small = Adapter(name="small", family="sd1")
    small.modules["unet"] = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
                             LoraModule(torch.randn(1, 32), torch.randn(32, 1), 1.0)}
    with pytest.raises(AdapterError, match="pass --base"):
        merge([(small, (1.0, "INS"))])
