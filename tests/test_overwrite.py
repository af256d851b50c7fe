"""Outputs never replace their inputs: merge, convert and bake refuse an output that is (or holds) what they read,
through links too, and replace another existing output only when asked (issue 22)."""

from __future__ import annotations

import os

import pytest
from test_webui_handlers import make_library

from stylelora.cli import main
from stylelora.models import ensure_tiny, load_base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = load_base("tiny-random")
    folder = make_library(base.pipe, tmp_path_factory.mktemp("overwrite") / "loras")
    return folder / "ink.safetensors", folder / "pastel.safetensors"


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_merge_never_replaces_an_input_and_asks_before_replacing_another_file(files, tmp_path, capsys):
    ink, pastel = files
    before = ink.read_bytes()
    link = tmp_path / "alias.safetensors"
    link.symlink_to(ink)
    hard = tmp_path / "hard.safetensors"
    os.link(ink, hard)
    for out in (ink, link, hard):
        for extra in ([], ["--overwrite"]):  # --overwrite never allows replacing an input
            rc, err = run(capsys, "merge", f"{ink}:0.5", f"{pastel}:0.5", "-o", out, *extra)
            assert rc != 0 and "would replace the input" in err, (out, extra, err)
    assert ink.read_bytes() == before and link.is_symlink()

    other = tmp_path / "other.safetensors"
    other.write_bytes(b"keep me")
    rc, err = run(capsys, "merge", f"{ink}:0.5", f"{pastel}:0.5", "-o", other)
    assert rc != 0 and "already exists" in err and "--overwrite" in err and other.read_bytes() == b"keep me"
    assert run(capsys, "merge", f"{ink}:0.5", f"{pastel}:0.5", "-o", other, "--overwrite")[0] == 0
    assert other.read_bytes() != b"keep me"


def test_bake_never_replaces_the_base_it_reads(files, tmp_path, capsys):
    ink, _ = files
    base_folder = tmp_path / "base"
    import shutil

    shutil.copytree(ensure_tiny("tiny-random"), base_folder)
    index = (base_folder / "model_index.json").read_bytes()
    for out in (base_folder, tmp_path):  # the base folder itself, or a folder holding it
        rc, err = run(capsys, "bake", "--base", base_folder, "--lora", f"{ink}:1", "-o", out, "--overwrite")
        assert rc != 0 and "would replace the input" in err, err
    assert (base_folder / "model_index.json").read_bytes() == index
