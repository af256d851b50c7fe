"""generate: A1111 prompt tags and --lora specs, name lookup, infotext in PNGs, CLI end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_blend import one_thread  # noqa: F401 - autouse fixture: one torch thread
from test_blend import quiet, three_adapters

from stylelora.blend import Blender
from stylelora.cli import main
from stylelora.errors import AdapterError, ConfigError
from stylelora.generate import Settings, generate, infotext, parse_infotext, quote, sampler_label, set_sampler
from stylelora.models import load_base
from stylelora.prompt import LoraRef, parse_prompt, parse_spec, resolve

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--seed", "7"]


# ------------------------------------------------------------------------------------------ prompt syntax
def test_prompt_tags_follow_a1111_order():
    clean, refs = parse_prompt("a lighthouse <lora:ink:0.8>, at dusk <lora:pastel:0.4:0.2> <LORA:plain>")
    assert clean == "a lighthouse, at dusk"
    # A1111: first number is the text-encoder multiplier, the second the UNet one (defaulting to the first)
    assert refs == [LoraRef("ink", 0.8, 0.8), LoraRef("pastel", unet=0.2, te=0.4), LoraRef("plain", 1.0, 1.0)]
    _, named = parse_prompt("<lora:a:te=0.3:unet=-1.5> <lyco:b:0.5>")
    assert named == [LoraRef("a", unet=-1.5, te=0.3), LoraRef("b", 0.5, 0.5)]
    kept, none = parse_prompt("x <hypernet:h:1> y")
    assert kept == "x <hypernet:h:1> y" and none == []
    with pytest.raises(ConfigError, match="not a number"):
        parse_prompt("<lora:ink:strong>")
    assert LoraRef("p", unet=0.2, te=0.4).tag() == "<lora:p:0.4:0.2>" and LoraRef("p", 0.5, 0.5).tag() == "<lora:p:0.5>"


def test_lora_specs_put_unet_first(tmp_path):
    assert parse_spec("ink.safetensors") == LoraRef("ink.safetensors", 1.0, 1.0)
    assert parse_spec("ink.safetensors:0.8") == LoraRef("ink.safetensors", 0.8, 0.8)
    assert parse_spec("ink.safetensors:0.4:-0.2") == LoraRef("ink.safetensors", unet=0.4, te=-0.2)
    assert parse_spec(r"C:\loras\ink.safetensors:0.5").source == r"C:\loras\ink.safetensors"
    odd = tmp_path / "a:0.5"
    odd.write_bytes(b"")
    assert parse_spec(str(odd)).source == str(odd)  # an existing file wins over the weight reading
    with pytest.raises(ConfigError, match="finite"):
        parse_spec("ink.safetensors:inf")


def test_unknown_name_lists_available(tmp_path):
    (tmp_path / "styles").mkdir()
    for name in ("ink", "styles/pastel"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x")
    assert resolve(LoraRef("pastel"), [tmp_path]) == tmp_path / "styles" / "pastel.safetensors"
    assert resolve(LoraRef("styles/pastel"), [tmp_path]) == tmp_path / "styles" / "pastel.safetensors"
    assert resolve(LoraRef("INK"), [tmp_path]) == tmp_path / "ink.safetensors"
    with pytest.raises(AdapterError, match=r"unknown adapter 'watercolor'.*Available: ink, pastel"):
        resolve(LoraRef("watercolor"), [tmp_path])
    with pytest.raises(AdapterError, match="--adapters"):
        resolve(LoraRef("watercolor"), [])


# ------------------------------------------------------------------------------------------ infotext
def test_infotext_matches_a1111_layout():
    text = infotext("a lighthouse <lora:ink:0.8>", "blurry, low quality", {
        "Steps": 30, "Sampler": "DPM++ 2M", "Schedule type": None, "CFG scale": "7", "Seed": 7, "Size": "512x512",
        "Model": "v1-5", "Lora hashes": "ink: 0123456789ab, pastel: ba9876543210"})
    assert text == ("a lighthouse <lora:ink:0.8>\nNegative prompt: blurry, low quality\n"
                    "Steps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 7, Size: 512x512, Model: v1-5, "
                    'Lora hashes: "ink: 0123456789ab, pastel: ba9876543210"')
    back = parse_infotext(text)
    assert back["Prompt"] == "a lighthouse <lora:ink:0.8>" and back["Negative prompt"] == "blurry, low quality"
    assert back["Lora hashes"] == "ink: 0123456789ab, pastel: ba9876543210" and back["Seed"] == "7"
    assert quote("plain") == "plain" and quote('a "b", c') == '"a \\"b\\", c"'


def test_sampler_names(tiny_base):
    pipe = load_base("tiny-random").pipe
    assert sampler_label(pipe.scheduler) == ("DPM++ 2M", None)
    set_sampler(pipe, "dpm++2m-karras")
    assert sampler_label(pipe.scheduler) == ("DPM++ 2M", "Karras")
    set_sampler(pipe, "euler-a")
    assert sampler_label(pipe.scheduler) == ("Euler a", None)
    assert pipe.scheduler.config.prediction_type == tiny_base.pipe.scheduler.config.prediction_type
    with pytest.raises(ConfigError, match="unknown sampler"):
        Settings("x", sampler="k_lms")


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from stylelora.formats import save_adapter

    base = load_base("tiny-random")
    folder = tmp_path_factory.mktemp("loras")
    for a in three_adapters(base.pipe):
        save_adapter(a, folder / f"{a.name}.safetensors", pipe=base.pipe)
    return folder


def png(path):
    image = Image.open(path)
    return np.asarray(image.convert("RGB")), image.info.get("parameters") or image.text["parameters"]


def test_cli_generate_tags_and_specs_agree(lora_dir, tmp_path, capsys):
    tags = tmp_path / "tags.png"
    assert main(["generate", "a lighthouse <lora:ink:0.8> <lora:pastel:0.4:0.2>", "--base", "tiny-random",
                 "--adapters", str(lora_dir), "-o", str(tags), "-n", "blurry", *FAST]) == 0
    pixels, params = png(tags)
    lines = params.split("\n")
    assert lines[0] == "a lighthouse <lora:ink:0.8> <lora:pastel:0.4:0.2>"
    assert lines[1] == "Negative prompt: blurry"
    fields = parse_infotext(params)
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"],
            fields["Model"]) == ("2", "DPM++ 2M", "7", "7", "32x32", "tiny-random")
    hashes = dict(item.split(": ") for item in fields["Lora hashes"].split(", "))
    assert set(hashes) == {"ink", "pastel"} and all(len(h) == 12 for h in hashes.values())

    # the same blend from --lora specs (UNet weight first) gives the same pixels; tags are added to the infotext
    specs = tmp_path / "specs.png"
    assert main(["generate", "a lighthouse", "--base", "tiny-random", "--lora", f"{lora_dir / 'ink.safetensors'}:0.8",
                 "--lora", f"{lora_dir / 'pastel.safetensors'}:0.2:0.4", "-o", str(specs), "-n", "blurry",
                 *FAST]) == 0
    pixels2, params2 = png(specs)
    assert params2.split("\n")[0] == "a lighthouse <lora:ink:0.8> <lora:pastel:0.4:0.2>"
    assert parse_infotext(params2)["Lora hashes"] == fields["Lora hashes"]
    assert np.array_equal(pixels, pixels2)

    # and the Python API with the names already loaded
    base = load_base("tiny-random")
    quiet(base.pipe)
    blender = Blender(base)
    for name in ("ink", "pastel"):
        blender.load(lora_dir / f"{name}.safetensors")
    image = generate(base, Settings("a lighthouse <lora:ink:0.8> <lora:pastel:0.4:0.2>", "blurry", seed=7,
                                    steps=2, width=32, height=32), blender)[0]
    assert blender.weights["pastel"] == (0.2, 0.4)
    assert np.array_equal(np.asarray(image), pixels) and image.info["parameters"] == params
    capsys.readouterr()


def test_cli_generate_errors(lora_dir, tmp_path, capsys):
    assert main(["generate", "x <lora:watercolor:1>", "--base", "tiny-random", "--adapters", str(lora_dir),
                 "-o", str(tmp_path / "a.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "unknown adapter 'watercolor'" in err and "ink, pastel, tonly" in err
    assert main(["generate", "x", "--base", "tiny-random", "-o", str(tmp_path / "a.jpg"), *FAST]) == 2
    assert ".png" in capsys.readouterr().err


def test_several_images_use_consecutive_seeds(lora_dir, tmp_path, capsys):
    out = tmp_path / "many.png"
    assert main(["generate", "a lighthouse", "--base", "tiny-random", "--lora", f"{lora_dir / 'tonly.safetensors'}:-0.5",
                 "-o", str(out), "--num-images", "2", "--sampler", "euler", *FAST]) == 0
    (a, pa), (b, pb) = png(tmp_path / "many-0.png"), png(tmp_path / "many-1.png")
    assert parse_infotext(pa)["Seed"] == "7" and parse_infotext(pb)["Seed"] == "8"
    assert parse_infotext(pa)["Sampler"] == "Euler" and "<lora:tonly:-0.5>" in pa
    assert not np.array_equal(a, b)
    capsys.readouterr()
