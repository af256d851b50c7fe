"""Bugs a new user found (issue #20): each test failed before its fix."""

from __future__ import annotations

import pytest
from PIL import Image

from stylelora.errors import ConfigError
from stylelora.webui import GridRequest
from stylelora.webui.handlers import MAX_CELLS, parse_values
from test_webui_handlers import request, studio  # noqa: F401  (the module-scoped Studio fixture)


def test_grid_with_no_y_axis_finishes(studio):  # noqa: F811
    # was: TypeError "unsupported format string passed to NoneType.__format__" after rendering every cell
    res = studio.grid(GridRequest(request(), "ink", [0.0, 1.0], "none", None, []))
    assert len(res.cells) == 2
    assert "X/Y grid: X ink weight 0, 1; Y none" in Image.open(res.path).info["parameters"]


def test_grid_size_message_counts_every_value(studio):  # noqa: F811
    # 0:100:0.5 has (100 - 0) / 0.5 + 1 = 201 values; with 2 seeds that is 402 images (was reported as 130)
    assert len(parse_values("0:100:0.5")) == 201
    with pytest.raises(ConfigError, match=f"402 images; at most {MAX_CELLS}"):
        studio.grid(GridRequest(request(), "ink", parse_values("0:100:0.5"), "seed", None, [1, 2]))


def test_sample_prompts_are_one_per_flag_or_line():
    from stylelora.cli import build_parser
    from stylelora.cli.train import config_from_args

    def prompts(*argv):
        return config_from_args(build_parser().parse_args(["train", "imgs", *argv])).run.sample_prompts

    # was: split on commas into three prompts
    assert prompts("--sample-prompts", "pastl, a small blue square, red") == ["pastl, a small blue square, red"]
    assert prompts("--sample-prompts", "pastl, a tree", "--sample-prompts", "a house") == ["pastl, a tree", "a house"]
    assert prompts("--sample-prompts", "pastl, a tree\na house, at dusk\n") == ["pastl, a tree", "a house, at dusk"]


def test_sample_pngs_carry_a_parameters_chunk(tiny_base, tmp_path):
    from accelerate import Accelerator

    from stylelora.config import TrainConfig
    from stylelora.generate import parse_infotext
    from stylelora.samples import write_samples

    cfg = TrainConfig().replace(folder="x", trigger="zzstyle", resolution=64, base="tiny-random",
                                sample_prompts=["zzstyle, a tree"], sample_steps=2, sample_seed=5)
    [path] = write_samples(tiny_base.pipe, cfg, tmp_path / "a.safetensors", 7, Accelerator(cpu=True),
                           return_paths=True)
    text = Image.open(path).info["parameters"]
    assert text.splitlines()[0] == "zzstyle, a tree"
    fields = parse_infotext(text)
    assert (fields["Steps"], fields["Seed"], fields["Size"], fields["Training step"]) == ("2", "5", "64x64", "7")


def test_weights_past_the_limit_are_clamped_with_a_warning_everywhere(studio, caplog):  # noqa: F811
    from stylelora.blend import MAX_WEIGHT, as_pair
    from stylelora.prompt import parse_prompt, parse_spec

    assert MAX_WEIGHT == 4.0
    with caplog.at_level("WARNING"):
        assert as_pair(parse_spec("x.safetensors:100").weights) == (4.0, 4.0)  # --lora x:100
        assert "outside -4..4; using 4" in caplog.text
        caplog.clear()
        assert as_pair(parse_prompt("<lora:x:-7:0.5>")[1][0].weights) == (0.5, -4.0)  # tag: te -7, unet 0.5
        assert "using 0.5, -4" in caplog.text
        caplog.clear()
        assert as_pair((1.5, -2.0)) == (1.5, -2.0) and not caplog.text  # inside the range: untouched, no warning
        # the web UI: the infotext shows the weight actually used (was: 100 typed, 2 used, nothing said)
        res = studio.generate(request(adapters={"ink": 100.0}))
    assert "<lora:ink:4>" in res.infotexts[0] and "outside -4..4" in caplog.text


def test_lora_weight_typo_is_named():
    from stylelora.prompt import parse_spec

    # was: "adapter 'ink.safetensors:abc': no such file"
    with pytest.raises(ConfigError, match="weight 'abc' is not a number"):
        parse_spec("ink.safetensors:abc")
    with pytest.raises(ConfigError, match="weight 'x' is not a number"):
        parse_spec("ink.safetensors:0.5:x")
    assert parse_spec(r"C:\loras\ink.safetensors").source == r"C:\loras\ink.safetensors"  # a Windows drive stays


def test_merged_adapter_keeps_trigger_words_and_inspect_shows_its_sources(tiny_base, tmp_path, capsys):
    import json

    from safetensors import safe_open

    from stylelora.cli import main
    from stylelora.formats import save_adapter
    from test_webui_handlers import random_adapter

    files = {}
    for name, trigger, seed in (("ink", "inkwash", 1), ("pastel", "pastl, soft", 2), ("off", "offword", 3)):
        a = random_adapter(tiny_base.pipe, name, 2, seed)
        a.metadata["modelspec.trigger_phrase"] = trigger
        files[name] = save_adapter(a, tmp_path / f"{name}.safetensors", pipe=tiny_base.pipe)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", f"{files['ink']}:0.6", f"{files['pastel']}:0.4", f"{files['off']}:0", "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:  # read the header with safetensors itself
        md = f.metadata()
    # was: no trigger at all; a source at weight 0 is not in the blend, so its word is not either
    assert md["modelspec.trigger_phrase"] == "inkwash, pastl, soft"
    capsys.readouterr()
    assert main(["inspect", str(out), "--no-hash"]) == 0
    text = capsys.readouterr().out
    assert "trigger         inkwash, pastl, soft" in text
    sources = json.loads(md["modelspec.merged_from"])  # what inspect must show, read from the header directly
    for s in sources:
        assert f"merged from     {s['name']} weight {s['weight']:g}, hash {s['sshs_model_hash'][:12]}" in text
    assert main(["inspect", str(out), "--json", "--no-hash"]) == 0
    assert json.loads(capsys.readouterr().out)["merged_from"] == sources


def test_skipped_images_are_a_plain_warning_without_the_skip_hint(tmp_path):
    import subprocess
    import sys

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"x")  # not a PNG
    out = subprocess.run([sys.executable, "-m", "stylelora", "train", str(tmp_path / "imgs"), "-o",
                          str(tmp_path / "o.safetensors"), "--trigger", "zz", "--skip-bad-images",
                          "--base", "tiny-random"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    # was: "…/data.py:351: UserWarning: skipped … or pass --skip-bad-images" and the source line of the warn call
    assert out.stderr.startswith("warning: skipped 1 unreadable image(s):\n")
    assert str(tmp_path / "imgs" / "broken.png") in out.stderr
    assert "UserWarning" not in out.stderr and "warnings.warn" not in out.stderr
    assert "--skip-bad-images" not in out.stderr


def test_ui_validation_errors_leave_no_traceback_and_progress_counts_images():
    import gradio as gr

    from stylelora.errors import AdapterError
    from stylelora.webui import app

    def pick_first():
        raise gr.Error("pick an adapter first")

    def bad_name():
        raise AdapterError("no such adapter")

    # gradio's queue prints a traceback for an Error whose print_exception is True (gradio/queueing.py)
    for fn, words in ((pick_first, "pick an adapter"), (bad_name, "no such adapter")):
        with pytest.raises(gr.Error, match=words) as e:
            app._ui(fn)()
        assert e.value.print_exception is False
    calls = []
    app._progress(lambda *a, **kw: calls.append((a, kw)))(1, 4, "image 2/4")
    assert calls == [(((1, 4),), {"desc": "image 2/4", "unit": "images"})]  # was gradio's default unit, "steps"


def test_existing_name_message_offers_only_what_the_ui_has(studio, tmp_path):  # noqa: F811
    from stylelora.errors import AdapterError

    with pytest.raises(AdapterError, match="already exists") as e:
        studio.convert_adapter("ink", "peft", "pastel")
    assert "allow overwriting" not in str(e.value) and "delete" in str(e.value)


def test_baked_models_get_the_usual_file_modes(tmp_path):
    import os

    from stylelora.bake import bake
    from stylelora.formats import save_adapter
    from stylelora.models import load_base
    from stylelora.prompt import LoraRef
    from test_webui_handlers import random_adapter

    tiny_base = load_base("tiny-random")  # our own: bake fuses the blend into it
    lora = save_adapter(random_adapter(tiny_base.pipe, "ink", 2, 1), tmp_path / "ink.safetensors", pipe=tiny_base.pipe)
    old = os.umask(0o022)
    try:
        folder = bake(tiny_base, [LoraRef(str(lora), 0.5, 0.5)], tmp_path / "baked")
        single = bake(tiny_base, [LoraRef(str(lora), 0.5, 0.5)], tmp_path / "baked.safetensors", single_file=True)
    finally:
        os.umask(old)
    modes = {p: p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*"), single]}
    # was 0700 folders and 0600 weights (safetensors' own mode) next to 0644 adapter files
    assert {oct(m) for p, m in modes.items() if p.is_dir()} == {"0o755"}
    assert {oct(m) for p, m in modes.items() if p.is_file()} == {"0o644"}


def test_generate_and_train_default_to_the_same_base():
    from stylelora.cli import build_parser
    from stylelora.config import TrainConfig

    # was: generate refused to run without --base while train used "tiny"
    assert build_parser().parse_args(["generate", "a lighthouse"]).base == TrainConfig().run.base


def test_webui_removes_its_temp_folder_on_sigterm(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "loras").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port (gradio cannot serve on port 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "stylelora", "webui", "--base", "tiny-random", "--adapters",
                             str(tmp_path / "loras"), "--port", str(port), "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # wait until it serves
            lines.append(line)
            if "press Ctrl+C" in line:
                break
        assert any(p.name.startswith("stylelora-webui-") for p in tmp.iterdir()), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    # was: the stylelora-webui-* folder (generated images, uploads) stayed behind
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("stylelora-webui-")]


def test_thumbnail_is_the_first_sample_with_content():
    from stylelora.config import TrainConfig
    from stylelora.samples import thumbnail_index

    def index(prompts, trigger="zzstyle"):
        return thumbnail_index(TrainConfig().replace(trigger=trigger, sample_prompts=prompts))

    # was always sample 0, even when it is the trigger word alone (noise on the tiny base)
    assert index(["zzstyle", "zzstyle, a red house", "a tree"]) == 1
    assert index(["ZZstyle ,", "a tree"]) == 1
    assert index(["a tree", "zzstyle"]) == 0
    assert index([]) == 0 and index(["zzstyle"]) == 0  # only the trigger: the first (and only) sample


def test_generate_tab_shows_and_inserts_trigger_words(studio, tmp_path):  # noqa: F811
    from stylelora.formats import save_adapter
    from stylelora.webui.app import build_app
    from stylelora.webui.handlers import insert_triggers
    from test_webui_handlers import random_adapter

    a = random_adapter(studio.base.pipe, "zzink", 2, 5)
    a.metadata["modelspec.trigger_phrase"] = "zzink, inkwash"
    save_adapter(a, studio.library.root / "zzink.safetensors", pipe=studio.base.pipe)
    try:
        # the library's own record of the file, read back by safetensors: the words the UI must offer
        from safetensors import safe_open

        with safe_open(str(studio.library.root / "zzink.safetensors"), "pt") as f:
            stored = f.metadata()["modelspec.trigger_phrase"]
        assert studio.trigger_words(["zzink", "ink", "not-there"]) == {"zzink": stored}
        assert insert_triggers("a lighthouse", [stored]) == "zzink, inkwash, a lighthouse"
        assert insert_triggers("ZZINK, a lighthouse", [stored]) == "inkwash, ZZINK, a lighthouse"  # said already
        assert insert_triggers("", ["pastl"]) == "pastl"
        assert build_app(studio) is not None  # the page still builds with the trigger row and its button
    finally:
        studio.delete_adapter("zzink")


def test_grid_column_labels_stay_over_their_own_column():
    import numpy as np

    from stylelora.grid import image_grid

    size, pad = 64, 4
    cells = [[Image.new("RGB", (size, size), "white") for _ in range(3)]]
    labels = ["pastel-watercolour 0.75", "pastel-watercolour 1", "ink 0.5"]
    grid = np.asarray(image_grid(cells, col_labels=labels, pad=pad).convert("L"))
    top = grid.shape[0] - size - 2 * pad  # the label band above the cells
    ink = grid[:top] < 128  # label pixels, found in the picture itself
    for j in range(3):
        x0 = pad + j * (size + pad)
        cols = np.nonzero(ink[:, x0:x0 + size + pad].any(axis=0))[0]
        assert cols.size, f"label {j} missing"
    # no label pixel falls in a gap between columns: each label ends before the next column starts
    for j in range(3):
        gap = slice(pad + j * (size + pad) + size, pad + (j + 1) * (size + pad))
        assert not ink[:, gap].any(), f"label {labels[j]!r} runs into the next column"
