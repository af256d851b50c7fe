"""Hostile input and faults through the web UI (issue 22): symlinked aliases, names taken during a run, links out
of a training root, what the HTTP server serves, zip bombs, and unbounded training settings."""

from __future__ import annotations

import io
import os
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import make_style_images
from stylelora.errors import ConfigError, DataError, StyleloraError
from stylelora.webui import Studio, TrainRequest
from stylelora.webui import paths
from stylelora.webui.training import prepare_uploads
from test_webui_handlers import make_library


@pytest.fixture(scope="module")
def base():
    from stylelora.models import load_base

    return load_base("tiny-random")  # the module's own copy: studios fuse adapters into it


@pytest.fixture
def studio(base, tmp_path):
    make_style_images(tmp_path / "datasets" / "stripes", n=2)
    s = Studio(base, make_library(base.pipe, tmp_path / "loras"), [tmp_path / "datasets"],
               work_dir=tmp_path / "work")
    yield s
    s.close()
    s.blender.reset()  # the next studio gets the plain base


def quick(name: str, **kw) -> TrainRequest:
    return TrainRequest(**{"name": name, "folder": "stripes", "trigger": "strp", "preset": "quick", "steps": 2,
                           "sample_every": 1, "sample_steps": 2, "resolution": 64, **kw})


# ---------------------------------------------------------------------------------------------- library
def test_deleting_a_symlinked_alias_removes_the_link_not_the_adapter(studio):
    root = studio.library.root
    ink = root / "ink.safetensors"
    before = ink.read_bytes()
    (root / "alias.safetensors").symlink_to("ink.safetensors")  # a relative link inside the folder
    (root / "sub").mkdir()
    (root / "sub" / "deep.safetensors").symlink_to(ink)  # an absolute one from a sub-folder
    assert {"alias", "sub/deep"} <= set(studio.adapters())
    assert studio.delete_adapter("alias") == "alias"
    assert studio.delete_adapter("sub/deep") == "sub/deep"
    assert not os.path.lexists(root / "alias.safetensors") and not os.path.lexists(root / "sub" / "deep.safetensors")
    assert ink.read_bytes() == before and "ink" in studio.adapters()


def test_a_link_out_of_the_adapter_folder_is_never_deleted_nor_its_target(studio, tmp_path):
    secret = tmp_path / "elsewhere" / "secret.safetensors"
    secret.parent.mkdir()
    shutil.copy(studio.library.root / "pastel.safetensors", secret)
    link = studio.library.root / "out.safetensors"
    link.symlink_to(secret)
    with pytest.raises(StyleloraError):
        studio.library.delete("out")  # even asked directly, past the Studio's name lookup
    assert secret.is_file() and link.is_symlink()


# ---------------------------------------------------------------------------------------------- training
def test_the_name_of_a_running_training_is_reserved(studio):
    job = studio.start_training(quick("taken"))
    try:
        ink = studio.library.root / "ink.safetensors"
        with pytest.raises(StyleloraError, match="training"):
            studio.import_adapter(str(ink), "taken")
        with pytest.raises(StyleloraError, match="training"):
            studio.convert_adapter("ink", "peft", "taken")
    finally:
        status = job.join(timeout=600)
    assert status["status"] == "done", status
    assert studio.library.info("taken").trigger == "strp"  # the trained adapter, not ink
    studio.import_adapter(str(studio.library.root / "ink.safetensors"), "free-again")  # reservations end


def test_a_finished_run_whose_name_was_taken_meanwhile_is_kept_under_a_free_name(studio):
    root = studio.library.root
    ink = (root / "ink.safetensors").read_bytes()
    train = studio._train_locked

    def train_then_collide(config, progress, should_stop):
        out = train(config, progress, should_stop)
        (root / "clash.safetensors").write_bytes(ink)  # another program wrote that name during the run
        return out

    studio._train_locked = train_then_collide
    status = studio.start_training(quick("clash")).join(timeout=600)
    assert status["status"] == "done", status
    assert status["adapter"] == "clash-2" and "clash-2" in status["message"] and "taken" in status["message"]
    assert (root / "clash.safetensors").read_bytes() == ink  # the other file is left alone
    assert studio.library.info("clash-2").trigger == "strp"


def test_links_in_a_training_root_never_bring_outside_files_in(studio, tmp_path):
    secret = tmp_path / "private" / "notes.txt"
    secret.parent.mkdir()
    secret.write_text("TOPSECRET-token")
    linked = studio.train_roots[0] / "linked"
    make_style_images(linked, n=2, captions=False)
    (linked / "img0.txt").symlink_to(secret)
    with pytest.raises(DataError, match="img0.txt") as e:
        studio.start_training(quick("leak", folder="linked"))
    assert "TOPSECRET" not in str(e.value) and str(secret) not in str(e.value)
    assert studio.job is None
    # the scan inside train() is confined too: a link swapped in after the check is refused there
    (linked / "img0.txt").unlink()
    calls = []

    def swap_then_train(config, progress, should_stop):
        (linked / "img0.txt").symlink_to(secret)
        calls.append(1)
        return train(config, progress, should_stop)

    train = studio._train_locked
    studio._train_locked = swap_then_train
    status = studio.start_training(quick("leak", folder="linked")).join(timeout=600)
    assert calls and status["status"] == "failed" and "img0.txt" in status["message"], status
    assert "leak" not in studio.adapters()


def test_training_settings_are_bounded_before_anything_starts(studio):
    for kw, word in (({"resolution": 2**31}, "resolution"), ({"resolution": 100}, "resolution"),
                     ({"resolution": float("inf")}, "resolution"), ({"steps": 2.5}, "steps"),
                     ({"steps": 10**9}, "steps"), ({"rank": 10**6}, "rank"), ({"lr": float("nan")}, "learning rate"),
                     ({"lr": 1e6}, "learning rate"), ({"sample_steps": 10**6}, "sample"),
                     ({"sample_every": -3}, "sample")):
        with pytest.raises(ConfigError, match=word):
            studio.start_training(quick("bounded", **kw))
    assert studio.job is None
    assert not (studio.work_dir / "train").exists() or not any((studio.work_dir / "train").iterdir())


# ---------------------------------------------------------------------------------------------- uploads
def zip_of(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_zip_bomb_is_refused_before_it_is_written_and_nothing_stays(tmp_path):
    limit = 1 << 20  # --max-upload-mb 1
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(zip_of({"a.png": b"\0" * (4 << 20)}, zipfile.ZIP_BZIP2))  # a few hundred bytes -> 4 MiB
    assert bomb.stat().st_size < 4096
    dest = tmp_path / "run" / "images"
    with pytest.raises(paths.UploadError, match="MiB"):
        prepare_uploads([str(bomb)], dest, max_bytes=limit)
    assert not dest.exists()  # refused uploads do not stay on disk
    # two archives under the limit each but over it together: the limit is for the whole upload
    half = tmp_path / "half.zip"
    half.write_bytes(zip_of({"a.png": os.urandom(600 << 10)}, zipfile.ZIP_STORED))
    half2 = tmp_path / "half2.zip"
    half2.write_bytes(zip_of({"b.png": os.urandom(600 << 10)}, zipfile.ZIP_STORED))
    with pytest.raises(paths.UploadError, match="MiB"):
        prepare_uploads([str(half), str(half2)], dest, max_bytes=limit)
    assert not dest.exists()


def test_a_damaged_member_is_an_upload_error_and_leaves_nothing(tmp_path):
    data = zip_of({"a.png": b"x" * 5000, "b.png": b"y" * 5000}, zipfile.ZIP_STORED)
    archive = tmp_path / "damaged.zip"
    archive.write_bytes(data.replace(b"y" * 100, b"z" * 100, 1))  # b.png no longer matches its CRC
    dest = tmp_path / "run" / "images"
    with pytest.raises(paths.UploadError, match="damaged.zip"):
        prepare_uploads([str(archive)], dest, max_bytes=1 << 20)
    assert not dest.exists()


def test_a_refused_upload_of_a_studio_leaves_no_run_folder(studio, tmp_path):
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(zip_of({"a.png": b"\0" * (3 << 20)}, zipfile.ZIP_BZIP2))
    studio.max_upload_bytes = 1 << 20
    with pytest.raises(paths.UploadError):
        studio.start_training(TrainRequest(name="bomb", uploads=[str(bomb)], trigger="x"))
    train_dir = studio.work_dir / "train"
    assert not train_dir.exists() or not any(train_dir.iterdir())


# ---------------------------------------------------------------------------------------------- serving
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_server_serves_what_the_page_shows_and_nothing_else(base, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from stylelora.webui import launch

    cwd = tmp_path / "project"  # `stylelora webui --outputs .` run in a project folder
    cwd.mkdir()
    (cwd / ".env").write_text("API_KEY=hunter2")
    (cwd / "notes.txt").write_text("private")
    monkeypatch.chdir(cwd)
    make_style_images(tmp_path / "datasets" / "stripes", n=2)
    studio = Studio(base, make_library(base.pipe, tmp_path / "loras"), [tmp_path / "datasets"], work_dir=".")
    try:
        status = studio.start_training(quick("served")).join(timeout=600)
        assert status["status"] == "done", status
        samples = [Path(p) for p in status["samples"]]
        assert samples and all(p.is_file() for p in samples)
        run_dirs = list((studio.work_dir / "train").iterdir())
        assert run_dirs and not any(run_dirs[0].name in str(p) for p in samples)  # the run folder is not named
        working = next(run_dirs[0].glob("*.safetensors"))
        from stylelora.webui.handlers import GenerateRequest

        shown = studio.generate(GenerateRequest(prompt="a lighthouse", steps=2, seed=1, width=64, height=64)).paths[0]
        demo, url, _ = launch(studio, port=_free_port(), block=False, quiet=True)
        try:
            file = url.rstrip("/") + "/gradio_api/file="
            for secret in (cwd / ".env", cwd / "notes.txt", working, studio.library.root / "ink.safetensors",
                           tmp_path / "datasets" / "stripes" / "img0.png"):
                assert _get(file + str(secret.resolve())) in (403, 404), secret
            assert _get(file + str(Path(shown).resolve())) == 200  # what the page shows stays reachable
            assert _get(file + str(samples[0].resolve())) == 200
        finally:
            demo.close()
    finally:
        studio.close()
        studio.blender.reset()
