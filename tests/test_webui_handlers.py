"""Web UI handlers (no Gradio): generate / reuse / grid with the tiny base, a tiny training job, the library
actions, and every way a browser could try to reach outside the allowed folders."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_style_images
from stylelora.adapter import Adapter, LoraModule
from stylelora.errors import AdapterError, ConfigError, StyleloraError

from stylelora.webui import GenerateRequest, GridRequest, Studio, TrainRequest
from stylelora.webui import paths
from stylelora.webui.handlers import BusyError, parse_values
from stylelora.webui.training import PRESETS, prepare_uploads

STEPS, SIZE = 2, 64


def random_adapter(pipe, name: str, rank: int, seed: int, std: float = 0.3) -> Adapter:
    """Random factors on the tiny pipe's attention layers (UNet and text encoder), big enough to show."""
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(name=name, family="sd1", metadata={"ss_sd_model_name": "tiny-random"})
    for comp, module, targets in (("unet", pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")),
                                  ("text_encoder", pipe.text_encoder, ("q_proj", "v_proj"))):
        adapter.modules[comp] = {
            path: LoraModule(down=torch.randn(rank, m.in_features, generator=g) * std,
                             up=torch.randn(m.out_features, rank, generator=g) * std, alpha=float(rank))
            for path, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and any(path.endswith("." + t) for t in targets)}
    return adapter


def make_library(pipe, folder: Path) -> Path:
    """An adapter folder with two random adapters, ``ink`` (rank 4) and ``pastel`` (rank 2)."""
    from stylelora.formats import save_adapter

    folder.mkdir(parents=True, exist_ok=True)
    save_adapter(random_adapter(pipe, "ink", 4, 1), folder / "ink.safetensors", pipe=pipe)
    save_adapter(random_adapter(pipe, "pastel", 2, 2), folder / "pastel.safetensors", pipe=pipe)
    return folder


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from stylelora.models import load_base

    root = tmp_path_factory.mktemp("webui")
    base = load_base("tiny-random")  # our own copy: the studio fuses adapters into it
    make_style_images(root / "datasets" / "stripes")
    s = Studio(base, make_library(base.pipe, root / "loras"), [root / "datasets"], work_dir=root / "work")
    yield s
    s.close()


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def request(**kw) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a lighthouse", "steps": STEPS, "seed": 3, "width": SIZE, "height": SIZE,
                              **kw})


# ---------------------------------------------------------------------------------------------- generate
def test_generate_blends_two_adapters_without_reloading_the_base(studio):
    pipe, blender = studio.base.pipe, studio.blender
    plain = studio.generate(request())
    res = studio.generate(request(adapters={"ink": 0.8, "pastel": (0.3, 0.5)}, num_images=2, seed=-1))
    assert len(res.paths) == 2 and 0 <= res.seed < 2**32
    text = Image.open(res.paths[0]).info["parameters"]  # the PNG carries exactly what the page shows
    assert text == res.infotexts[0]
    assert "<lora:ink:0.8>" in text and "<lora:pastel:0.5:0.3>" in text and f"Seed: {res.seed}," in text
    assert "Lora hashes" in text and f"Seed: {res.seed + 1}," in res.infotexts[1]
    moved = studio.generate(request(adapters={"ink": 0.2, "pastel": (0.3, 0.5)}))
    assert studio.base.pipe is pipe and studio.blender is blender  # a slider move only re-blends
    assert np.abs(pixels(moved.paths[0]) - pixels(plain.paths[0])).max() > 0
    # reuse: the seed of a random-seed run reproduces its image bit for bit
    again = studio.generate(request(adapters={"ink": 0.8, "pastel": (0.3, 0.5)}, seed=res.seed))
    assert studio.last_seed == res.seed
    assert np.array_equal(pixels(again.paths[0]), pixels(res.paths[0]))
    # all weights 0 gives the base back exactly
    zero = studio.generate(request(adapters={"ink": 0.0, "pastel": 0.0}))
    assert np.array_equal(pixels(zero.paths[0]), pixels(plain.paths[0]))


def test_a_loaded_adapter_replaced_by_a_damaged_file_does_not_block_generation(tmp_path):
    from stylelora.models import load_base

    base = load_base("tiny-random")
    folder = make_library(base.pipe, tmp_path / "loras")
    s = Studio(base, folder, [], work_dir=tmp_path / "work")
    try:
        s.generate(request(adapters={"ink": 0.8}))
        (folder / "ink.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
        assert s.generate(request(adapters={"pastel": 0.5})).paths  # the damaged one is dropped, not re-read
        assert "ink" not in s.blender.loaded
        with pytest.raises(StyleloraError, match="ink.safetensors"):  # asking for it names the file
            s.generate(request(adapters={"ink": 0.8}))
    finally:
        s.close()


def test_prompt_tags_are_looked_up_in_the_library_only(studio):
    res = studio.generate(request(prompt="a lighthouse <lora:pastel:0.7>"))
    assert "<lora:pastel:0.7>" in res.infotexts[0]
    for bad in ("<lora:../../etc/passwd:1>", f"<lora:{studio.library.root / 'ink.safetensors'}:1>",
                "<lora:nosuch:1>"):
        with pytest.raises(StyleloraError):
            studio.generate(request(prompt=f"a lighthouse {bad}"))


def test_block_weights_equal_the_python_api_and_bad_vectors_change_nothing(studio):
    from stylelora.blend import Blender
    from stylelora.generate import Settings, generate
    from stylelora.models import load_base

    req = request(adapters={"ink": 0.8, "pastel": (0.3, 0.5)}, blocks={"ink": "INS", "pastel": ""})
    res = studio.generate(req)
    text = res.infotexts[0]
    assert "<lora:ink:0.8:lbw=INS>" in text and "<lora:pastel:0.5:0.3>" in text, text
    assert res.notes == []
    # the reference: the Python API on a base of its own, the adapters read from the library's files
    base = load_base("tiny-random")
    base.pipe.set_progress_bar_config(disable=True)
    blender = Blender(base)
    for name in ("ink", "pastel"):
        blender.load(studio.library.path(name), name=name)
    vector = "1,0,0,0,0,0,0,1,0,0,0,1,1,0,0,0,1"
    blender.set({"ink": ((0.8, 0.8), "INS"), "pastel": (0.3, 0.5)})
    want = generate(base, Settings(prompt="a lighthouse", seed=3, steps=STEPS, guidance=7.0, width=SIZE,
                                   height=SIZE), blender)[0]
    assert np.array_equal(pixels(res.paths[0]), np.asarray(want.convert("RGB"), dtype=np.int16))
    assert want.info["parameters"] == text
    plain = studio.generate(request(adapters={"ink": 0.8, "pastel": (0.3, 0.5)}))  # the vector matters
    assert np.abs(pixels(plain.paths[0]) - pixels(res.paths[0])).max() > 0
    # a comma list, and the X/Y grid keeps the swept adapter's blocks in every cell
    listed = studio.generate(request(adapters={"ink": 0.8}, blocks={"ink": vector}))
    assert f"<lora:ink:0.8:lbw={vector}>" in listed.infotexts[0]
    grid = studio.grid(GridRequest(request(adapters={"ink": 0.8}, blocks={"ink": vector}), x_adapter="ink",
                                   x_values=[0.8], y_kind="none"))
    blender.set({"ink": (0.8, vector)})
    want = generate(base, Settings(prompt="a lighthouse", seed=3, steps=STEPS, guidance=7.0, width=SIZE,
                                   height=SIZE), blender)[0]
    assert np.array_equal(pixels(grid.cells[0]), np.asarray(want.convert("RGB"), dtype=np.int16))
    assert f"lbw={vector}" in Image.open(grid.cells[0]).info["parameters"]
    # a vector for another family is allowed (A1111 zeroes the unlisted blocks) but the page says so
    sdxl = studio.generate(request(adapters={"ink": 0.8}, blocks={"ink": "1,1,1,1,1,1,1,1,1,1,1,1"}))
    assert len(sdxl.notes) == 1 and "'ink'" in sdxl.notes[0] and "17" in sdxl.notes[0], sdxl.notes
    # bad vectors: a clear message naming the adapter and the problem; no image, the blend and seed unchanged
    before = (studio.blender.weights, studio.blender.blocks, sorted(studio.outputs.iterdir()), studio.last_seed)
    for bad, words in (("1,2,3", "3 values"), ("ins", "presets are case-sensitive: 'INS'"),
                       ("BOGUS", "unknown preset 'BOGUS'"), ("1,nan" + ",1" * 15, "finite"),
                       ("1,x" + ",1" * 15, "value 2 ('x') is not a number")):
        with pytest.raises(ConfigError, match="block weights of 'ink'") as err:
            studio.generate(request(adapters={"ink": 0.8}, blocks={"ink": bad}, seed=99))
        assert words in str(err.value), (bad, str(err.value))
    with pytest.raises(ConfigError, match="'pastel', which is not picked"):
        studio.generate(request(adapters={"ink": 0.8}, blocks={"pastel": "INS"}))
    with pytest.raises(ConfigError, match="block weights of 'ink'"):
        studio.grid(GridRequest(request(adapters={"ink": 0.8}, blocks={"ink": "1,2"}), x_adapter="ink",
                                x_values=[0.5], y_kind="none"))
    assert (studio.blender.weights, studio.blender.blocks, sorted(studio.outputs.iterdir()),
            studio.last_seed) == before
    # the prompt's own lbw tag works too (it was read without its blocks before)
    tagged = studio.generate(request(prompt="a lighthouse <lora:ink:0.8:lbw=INS> <lora:pastel:0.5:0.3>"))
    assert np.array_equal(pixels(tagged.paths[0]), pixels(res.paths[0]))


def test_blend_report_table_equals_the_interference_api(studio):
    import re

    from stylelora.blend import read_adapter
    from stylelora.formats import save_adapter
    from stylelora.interference import report

    save_adapter(random_adapter(studio.base.pipe, "ochre", 3, 5), studio.library.root / "ochre.safetensors",
                 pipe=studio.base.pipe)
    try:
        names = ["ink", "pastel", "ochre"]
        got = studio.blend_report(names)
        want = report([(n, read_adapter(studio.library.path(n), pipe=studio.base.pipe)) for n in names])
        assert got.result == want and got.grid is None
        assert [(p["a"], p["b"]) for p in want["pairs"]] == [("ink", "pastel"), ("ink", "ochre"), ("pastel", "ochre")]
        # every row of the page's table shows the API's numbers
        rows = {}
        pair = None
        for line in got.table.splitlines():
            head = re.match(r"\*\*(\S+)\*\* vs \*\*(\S+)\*\*", line)
            if head:
                pair = head.groups()
            elif line.startswith("| ") and not line.startswith("| block"):
                cells = [x.strip() for x in line.strip("|").split("|")]
                rows[(*pair, cells[0])] = cells[1:]
        expected = {}
        for p in want["pairs"]:
            for block, f in [*p["blocks"].items(), ("total", p["total"])]:
                expected[(p["a"], p["b"], block)] = [str(f["modules"]), f"{f['cosine']:+.3f}", f"{f['input']:.3f}",
                                                     f"{f['output']:.3f}", f"{f['norm_a']:.3g}", f"{f['norm_b']:.3g}"]
        assert rows == expected
        assert {"unet down", "unet mid", "unet up", "text_encoder"} <= {k[2] for k in rows}
        # every module of the pair is compared
        total = want["pairs"][0]["total"]
        assert total["modules"] == sum(len(m) for m in read_adapter(studio.library.path("ink")).modules.values())
        with pytest.raises(ConfigError, match="the weight sweep takes two adapters, 3 are picked"):
            studio.blend_report(names, sweep=True)
    finally:
        studio.delete_adapter("ochre")
    for bad, words in ((["ink"], "pick two or more"), (["ink", "ink"], "pick two or more")):
        with pytest.raises(ConfigError, match=words):
            studio.blend_report(bad)
    with pytest.raises(StyleloraError, match="nosuch"):
        studio.blend_report(["ink", "nosuch"])


def test_blend_report_sweep_grid_equals_interference_sweep(studio):
    from stylelora.blend import read_adapter
    from stylelora.interference import sweep

    before = studio.generate(request(adapters={"ink": 0.8, "pastel": 0.4}))
    got = studio.blend_report(["ink", "pastel"], sweep=True, weights="0, 1", prompt="a lighthouse", steps=STEPS,
                              seed=1)
    assert got.grid is not None and got.grid.parent == studio.outputs
    adapters = [(n, read_adapter(studio.library.path(n), pipe=studio.base.pipe)) for n in ("ink", "pastel")]
    want, _ = sweep(studio.base, adapters, weights=[0.0, 1.0], prompt="a lighthouse", steps=STEPS, seed=1)
    assert np.array_equal(pixels(got.grid), np.asarray(want.convert("RGB"), dtype=np.int16))
    assert "rows ink weight, columns pastel weight" in Image.open(got.grid).info["parameters"]
    after = studio.generate(request(adapters={"ink": 0.8, "pastel": 0.4}))  # the blend comes back
    assert np.array_equal(pixels(after.paths[0]), pixels(before.paths[0]))
    for kw, words in ((dict(weights="a, b"), "give numbers"), (dict(weights="0:1:0.1"), "at most 64"),
                      (dict(steps=0), "steps must be")):
        with pytest.raises(ConfigError, match=words):
            studio.blend_report(["ink", "pastel"], sweep=True, **kw)


def test_generate_refuses_bad_settings_with_messages(studio):
    for kw, words in (({"prompt": " "}, "prompt"), ({"steps": 0}, "steps"), ({"width": 100}, "multiples of 8"),
                      ({"num_images": 99}, "number of images"), ({"sampler": "magic"}, "scheduler"),
                      ({"adapters": {"../ink": 1.0}}, "..")):
        with pytest.raises(StyleloraError, match=words):
            studio.generate(request(**kw))


def test_xy_grid_sweeps_weights_against_seeds_and_adapters(studio):
    res = studio.grid(GridRequest(request(adapters={"pastel": 0.5}), "ink", [0.0, 1.0], "seed", None, [1, 2]))
    grid = Image.open(res.path)
    assert len(res.cells) == 4 and grid.width > 2 * SIZE and grid.height > 2 * SIZE
    assert "X/Y grid: X ink weight 0, 1; Y seeds 1, 2" in grid.info["parameters"]
    texts = [Image.open(p).info["parameters"] for p in res.cells]
    assert "Seed: 1," in texts[0] and "Seed: 2," in texts[2] and "<lora:ink:1>" in texts[1]
    assert not np.array_equal(pixels(res.cells[0]), pixels(res.cells[1]))  # the weight changes the image
    both = studio.grid(GridRequest(request(), "ink", [0.0, 1.0], "adapter", "pastel", [0.5]))
    assert len(both.cells) == 2 and "Y pastel weight 0.5" in both.infotext
    assert "<lora:pastel:0.5>" in Image.open(both.cells[0]).info["parameters"]
    with pytest.raises(ConfigError, match="different"):
        studio.grid(GridRequest(request(), "ink", [0.0], "adapter", "ink", [1.0]))
    with pytest.raises(ConfigError, match="at most"):
        studio.grid(GridRequest(request(), "ink", parse_values("0:1:0.01"), "seed", None, [1, 2]))
    assert parse_values("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_values("1, 2,3", integers=True) == [1, 2, 3]
    with pytest.raises(ConfigError):
        parse_values("a, b")


# ---------------------------------------------------------------------------------------------- training
def test_tiny_training_job_lands_in_the_library(studio):
    folder = studio.image_folders()[0]
    assert folder.endswith("stripes")
    job = studio.start_training(TrainRequest(name="stripes", folder=folder, trigger="strp", preset="quick",
                                             steps=2, sample_every=1, sample_steps=STEPS))
    with pytest.raises(BusyError, match="training"):  # the one model is busy: a clear message, no waiting
        studio.generate(request())
    with pytest.raises(BusyError, match="already"):
        studio.start_training(TrainRequest(name="other", folder=folder))
    status = job.join(timeout=600)
    assert status["status"] == "done", status
    assert status["step"] == 2 and status["loss"] is not None and status["samples"]
    assert all(Path(p).is_file() for p in status["samples"])
    info = studio.library.info("stripes")
    assert info.trigger == "strp" and info.rank == PRESETS["quick"]["rank"] and info.training["steps"] == 2
    assert info.thumbnail is not None and info.thumbnail.is_file()
    assert "stripes" in studio.adapters()
    assert sorted(p.name for p in studio.library.root.iterdir()) == ["ink.safetensors", "pastel.safetensors",
                                                                     "stripes.safetensors"]
    res = studio.generate(request(prompt="strp lighthouse", adapters={"stripes": 1.0}))
    assert "<lora:stripes:1>" in res.infotexts[0]
    with pytest.raises(AdapterError, match="already exists"):
        studio.start_training(TrainRequest(name="stripes", folder=folder))


def test_training_with_learnt_trigger_tokens_from_the_ui(studio):
    folder = studio.image_folders()[0]
    vocab = len(studio.base.pipe.tokenizer)
    job = studio.start_training(TrainRequest(name="tokens", folder=folder, trigger="tkst", preset="quick", steps=2,
                                             sample_every=0, train_tokens=2))
    assert job.join(timeout=600)["status"] == "done"
    assert len(studio.base.pipe.tokenizer) == vocab  # the borrowed base got its tokenizer back
    lib = studio.library
    assert (lib.root / "tokens_emb.safetensors").is_file() and "tokens_emb" not in studio.adapters()
    assert studio.library.details("tokens")  # listed and described
    res = studio.generate(request(prompt="tkst lighthouse", adapters={"tokens": 1.0}))
    assert "<lora:tokens:1>" in res.infotexts[0]
    assert len(studio.base.pipe.tokenizer) == vocab + 2  # the learnt tokens are in while the adapter is blended
    studio.generate(request(prompt="tkst lighthouse"))
    assert len(studio.base.pipe.tokenizer) == vocab  # ... and out again without it
    with pytest.raises(ConfigError, match="learnt trigger tokens"):
        studio.start_training(TrainRequest(name="bad", folder=folder, trigger="x", train_tokens=100))
    lib.delete("tokens")
    assert not (lib.root / "tokens_emb.safetensors").exists()


def test_training_from_uploaded_files_can_be_stopped(studio, tmp_path):
    files = sorted(str(p) for p in make_style_images(tmp_path / "upload", n=2).iterdir())
    job = studio.start_training(TrainRequest(name="stopped", uploads=files, trigger="strp", steps=50,
                                             sample_every=0))
    job.stop()
    status = job.join(timeout=600)
    assert status["status"] == "stopped", status
    assert "stopped" not in studio.adapters()
    kept = job.config.data.folder  # the uploads were copied into the studio's own work folder
    assert Path(kept).is_relative_to(studio.work_dir) and len(list(Path(kept).glob("*.png"))) == 2


def test_failed_training_gives_the_base_back(studio, monkeypatch):
    from peft.tuners.lora import LoraLayer

    from stylelora.webui.training import TrainJob

    plain = studio.generate(request())

    def boom(self, report):
        raise RuntimeError("boom")

    monkeypatch.setattr(TrainJob, "_progress", boom)  # fails inside train(), after the LoRA layers went in
    status = studio.start_training(TrainRequest(name="broken", folder="stripes", trigger="strp", steps=3,
                                                sample_every=0)).join(timeout=600)
    assert status["status"] == "failed" and "boom" in status["message"]
    assert not any(isinstance(m, LoraLayer) for m in studio.base.pipe.unet.modules())
    assert np.array_equal(pixels(studio.generate(request()).paths[0]), pixels(plain.paths[0]))
    assert "broken" not in studio.adapters()


def test_training_refuses_paths_outside_the_roots(studio, tmp_path):
    outside = make_style_images(tmp_path / "elsewhere")
    link = studio.train_roots[0] / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for folder in ("../../etc", "/etc", str(outside), "link-out", str(link), "stripes/../../.."):
            with pytest.raises(paths.UnsafePathError):
                studio.start_training(TrainRequest(name="x", folder=folder))
    finally:
        link.unlink()
    for name in ("../evil", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(paths.UnsafePathError):
            studio.start_training(TrainRequest(name=name, folder="stripes"))
    with pytest.raises(ConfigError, match="preset"):
        studio.start_training(TrainRequest(name="x", folder="stripes", preset="forever"))
    assert studio.job is None or not studio.job.running


def zip_bytes(entries: dict[str, bytes], link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def test_training_uploads_are_checked(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    good = tmp_path / "set.zip"
    good.write_bytes(zip_bytes({"style/a.png": png.getvalue(), "style/a.txt": b"red", "notes.exe": b"MZ",
                                "__MACOSX/._a.png": b"junk"}))
    out = prepare_uploads([str(good)], tmp_path / "ok", max_bytes=1 << 20)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["style/a.png",
                                                                                            "style/a.txt"]
    for i, (entries, link) in enumerate((({"../evil.png": png.getvalue()}, None),
                                         ({"/abs/evil.png": png.getvalue()}, None),
                                         ({"a.png": png.getvalue()}, "link.png"))):
        bad = tmp_path / f"bad{i}.zip"
        bad.write_bytes(zip_bytes(entries, link))
        with pytest.raises(paths.UploadError):
            prepare_uploads([str(bad)], tmp_path / f"out{i}", max_bytes=1 << 20)
    assert not (tmp_path / "evil.png").exists()
    script = tmp_path / "run.sh"
    script.write_text("echo hi")
    with pytest.raises(paths.UploadError, match="upload images"):
        prepare_uploads([str(script)], tmp_path / "s", max_bytes=1 << 20)
    with pytest.raises(paths.UploadError, match="limit"):
        prepare_uploads([str(good)], tmp_path / "big", max_bytes=10)


# ---------------------------------------------------------------------------------------------- library
def test_library_lists_metadata(studio):
    rows = {r[0]: r for r in studio.library_rows()}
    assert rows["ink"][1:3] == ["sd1", 4] and rows["pastel"][2] == 2
    details = studio.adapter_details("ink")
    assert details["family"] == "sd1" and len(details["sshs_model_hash"]) == 64


def test_import_convert_merge_delete(studio, tmp_path):
    upload = tmp_path / "upload" / "ink copy.safetensors"
    upload.parent.mkdir()
    shutil.copy(studio.library.root / "ink.safetensors", upload)
    assert studio.import_adapter(str(upload)) == "ink copy"
    with pytest.raises(AdapterError, match="already exists"):
        studio.import_adapter(str(upload))
    assert studio.import_adapter(str(upload), "renamed") == "renamed"
    peft = studio.convert_adapter("renamed", "peft")
    assert peft == "renamed-peft" and studio.library.info(peft).format == "peft"
    merged = studio.merge_adapters({"ink": 0.5, "pastel": (0.5, 0.25)}, "blend")
    info = studio.library.info(merged)
    assert info.rank == 6 and "merged_from" in info.training and "merged from" in info.summary()
    low = studio.merge_adapters({"ink": 1.0, "pastel": 1.0}, "blend-r2", rank=2)
    assert studio.library.info(low).rank == 2
    # an adapter in use is dropped from the blend when its file is deleted
    studio.generate(request(adapters={"blend": 1.0}))
    assert "blend" in studio.blender.loaded
    for name in ("ink copy", "renamed", "renamed-peft", "blend", "blend-r2"):
        studio.delete_adapter(name)
    studio.generate(request(adapters={"ink": 1.0}))
    assert "blend" not in studio.blender.loaded
    assert {"ink", "pastel"} <= set(studio.adapters()) and "blend" not in studio.adapters()
    with pytest.raises(AdapterError, match="not in the library"):
        studio.generate(request(adapters={"blend": 1.0}))


def _delta(m) -> torch.Tensor:
    return m.scale * m.up.double().flatten(1) @ m.down.double().flatten(1)


@pytest.mark.parametrize("rule, value, max_rank, expect", [
    ("energy", "0.9", 3, {"energy": 0.9, "max_rank": 3}),
    ("budget", "50K", None, {"budget": "50K"}),
    ("cumulative", 0.5, 0, {"cumulative": 0.5}),
])
def test_library_resize_equals_stylelora_resize(studio, rule, value, max_rank, expect):
    from stylelora.blend import file_digests
    from stylelora.formats import describe, load_adapter
    from stylelora.resize import resize

    src = studio.library.root / "ink.safetensors"
    sha = file_digests(src)[0]
    made, table = studio.resize_adapter("ink", f"ink-{rule}", rule=rule, value=value, max_rank=max_rank)
    try:
        assert made == f"ink-{rule}" and file_digests(src)[0] == sha  # a new entry; the source untouched
        want = resize(load_adapter(src, pipe=studio.base.pipe), **expect)
        got = load_adapter(studio.library.path(made), pipe=studio.base.pipe)
        assert want.after and len(set(want.after.values())) >= 1
        for (comp, path), k in want.after.items():
            m = got.modules[comp][path]
            assert m.rank == k, (comp, path)
            torch.testing.assert_close(_delta(m), _delta(want.adapter.modules[comp][path]), rtol=1e-5, atol=1e-7)
        assert describe(studio.library.path(made), hashes=False)["format"] == "kohya"
        md = got.metadata["stylelora.resize"]
        assert sha in md and f'"{next(iter(expect))}' in md.replace("budget_bytes", "budget")
        for row in want.rows():  # the table the CLI prints: ranks after (min/median/max) and energy kept per part
            lo, mid, hi = row["after"]
            assert f"{lo}/{mid:g}/{hi}" in table and f"{100 * row['energy']:.2f}%" in table, table
        assert made in studio.adapters()
    finally:
        studio.delete_adapter(made)


def test_library_resize_measures_on_the_plain_base_and_refuses_bad_parameters(studio):
    from stylelora.formats import load_adapter
    from stylelora.resize import resize, unet_error

    before = studio.generate(request(adapters={"ink": 1.0}))  # ink is fused when the resize starts
    made, table = studio.resize_adapter("ink", "ink-r2", rule="rank", value="2", measure=True)
    try:
        original = load_adapter(studio.library.root / "ink.safetensors", pipe=studio.base.pipe)
        want = resize(original, rank=2)
        error = unet_error(studio.base, original, [want.adapter])[0]  # on the plain base (nothing fused now)
        assert f"relative error vs the original: {error:.4g}" in table, table
        assert 0 < error < 1
        after = studio.generate(request(adapters={"ink": 1.0}))  # the blend comes back as it was
        assert (pixels(after.paths[0]) == pixels(before.paths[0])).all()
    finally:
        studio.delete_adapter(made)
    names = sorted(studio.adapters())
    for kw, message in (
            ({"rule": "energy", "value": "1.5"}, r"energy must be in \(0, 1\]"),
            ({"rule": "energy", "value": "abc"}, "energy 'abc' is not a number"),
            ({"rule": "rank", "value": "2.5"}, "rank '2.5' is not a whole number"),
            ({"rule": "rank", "value": "0"}, "rank must be a whole number >= 1"),
            ({"rule": "ratio", "value": "0.5"}, "ratio must be >= 1"),
            ({"rule": "budget", "value": "12 parsecs"}, "expected a size in bytes"),
            ({"rule": "budget", "value": "1K"}, "too small: one rank per module"),
            ({"rule": "energy", "value": ""}, "give the energy value"),
            ({"rule": "energy", "value": "0.9", "max_rank": -1}, "max rank must be a whole number"),
            ({"rule": "volume", "value": "1"}, "unknown resize rule"),
            ({"rule": "max error", "value": "0.001", "max_rank": 1}, "no resize keeps the UNet output within max err")):
        with pytest.raises(ConfigError, match=message) as caught:
            studio.resize_adapter("ink", "ink-bad", **kw)
        assert "--" not in str(caught.value), caught.value  # the page's field names, not the CLI's flags
    with pytest.raises(AdapterError, match="already exists"):
        studio.resize_adapter("ink", "pastel", rule="rank", value="1")
    assert sorted(studio.adapters()) == names  # nothing was written


def test_bad_uploads_are_refused_and_nothing_is_kept(studio, tmp_path):
    before = sorted(os.listdir(studio.library.root))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    header_only = tmp_path / "huge-header.safetensors"
    header_only.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    pickle = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    not_lora = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (junk, header_only, pickle, not_lora, empty):
        with pytest.raises(paths.UploadError):
            studio.import_adapter(str(path))
    ink = studio.library.root / "ink.safetensors"
    for name in ("../../etc/passwd", "/etc/passwd", "sub/../../x", "..", ".hidden", "a\\b"):
        with pytest.raises(paths.UnsafePathError):
            studio.import_adapter(str(ink), name)
    limit = studio.library.max_upload_bytes
    studio.library.max_upload_bytes = 1000
    try:
        with pytest.raises(paths.UploadError, match="limit"):
            studio.import_adapter(str(ink), "too-big")
    finally:
        studio.library.max_upload_bytes = limit
    assert sorted(os.listdir(studio.library.root)) == before
    assert not (studio.library.root.parent / "x.safetensors").exists()


def test_library_names_cannot_escape_the_folder(studio, tmp_path):
    secret = tmp_path / "secret.safetensors"
    shutil.copy(studio.library.root / "ink.safetensors", secret)
    link = studio.library.root / "link.safetensors"
    link.symlink_to(secret)
    try:
        assert "link" not in studio.adapters()  # a link out of the folder is not listed ...
        for action in (lambda n: studio.delete_adapter(n), lambda n: studio.adapter_details(n),
                       lambda n: studio.convert_adapter(n, "peft"),
                       lambda n: studio.generate(request(adapters={n: 1.0}))):
            for name in ("link", "../" + secret.stem, str(secret), "../../etc/passwd"):
                with pytest.raises(StyleloraError):  # ... nor reachable by name
                    action(name)
        assert secret.exists()
        with pytest.raises(paths.UnsafePathError):
            studio.merge_adapters({"ink": 1.0}, "../merged-outside")
        with pytest.raises(paths.UnsafePathError):
            studio.convert_adapter("ink", "peft", "../../converted")
    finally:
        link.unlink()
    assert not list(tmp_path.parent.glob("*.safetensors"))


def test_paths_helpers(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    assert paths.within(root, "sub") == (root / "sub").resolve()
    assert paths.within(root, str(root / "sub")) == (root / "sub").resolve()
    for bad in ("..", "../root2", "/etc", "sub/../../x", "", "a\x00b"):
        with pytest.raises(paths.UnsafePathError):
            paths.within(root, bad, must_exist=False)
    assert paths.safe_name("my style (v2).1") == "my style (v2).1"
    for bad in ("a/b", "..", "../x", ".env", "con", "x" * 121, "a:b", "tab\tname"):
        with pytest.raises(paths.UnsafePathError):
            paths.safe_name(bad)
    assert paths.adapter_stem("sub/ink.safetensors") == "sub/ink"
    # names of uploaded files: directories dropped, odd characters replaced, never a way out
    assert paths.upload_name("../../etc/passwd") == "passwd"
    assert paths.upload_name("C:\\Users\\me\\café 12:00.png") == "caf_ 12_00.png"
    assert paths.upload_name("..hidden.safetensors") == "hidden.safetensors"


def test_cli_serves_on_localhost_without_share_unless_asked(studio, monkeypatch):
    import stylelora.webui as webui
    from stylelora import models
    from stylelora.cli import build_parser

    args = build_parser().parse_args(["webui", "--base", "tiny-random", "--adapters", str(studio.library.root)])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    seen = {}
    monkeypatch.setattr(models, "load_base", lambda spec, **kw: studio.base)
    class Served:
        def block_thread(self):
            seen["blocked"] = True

    def launch(s, **kw):
        seen.update(kw, studio=s)
        return Served(), f"http://{kw['host']}:{kw['port']}/", None

    monkeypatch.setattr(webui, "launch", launch)
    assert args.func(args) == 0
    assert seen["host"] == "127.0.0.1" and seen["share"] is False and seen["blocked"]
    assert seen["studio"].adapters() == studio.adapters()
    args = build_parser().parse_args(["webui", "--base", "tiny-random", "--adapters", str(studio.library.root), "--share",
                                      "--port", "9999"])
    args.func(args)
    assert seen["share"] is True and seen["port"] == 9999


def test_switch_base_is_explicit(tmp_path, studio):
    studio.blender.reset()  # the studios below share this pipe: give them the plain weights
    base = studio.base
    other = Studio(base, studio.library.root, bases={"tiny-random": "tiny-random", "again": "tiny-random"}, loader=lambda spec: base,
                   work_dir=tmp_path / "w")
    with pytest.raises(ConfigError, match="unknown base"):
        other.switch_base("/etc/passwd")
    old_blender = other.blender
    assert other.switch_base("again") == "tiny-random" and other.blender is not old_blender
    assert other.base_label == "again"
    single = Studio(base, studio.library.root, work_dir=tmp_path / "w2")
    with pytest.raises(ConfigError, match="single base"):
        single.switch_base("tiny-random")
