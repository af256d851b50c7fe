"""Base model loading: tiny, local diffusers folders, hub ids offline, single files; clear errors."""

from __future__ import annotations

import pytest

from stylelora.errors import ModelError
from stylelora.models import detect_family, load_base


def test_local_diffusers_folder_loads_with_family(tmp_path, tiny_base):
    folder = tmp_path / "my-model"
    tiny_base.pipe.save_pretrained(folder)
    base = load_base(str(folder))
    assert base.family.key == "sd1" and base.name == "my-model"
    assert detect_family(base.pipe) == tiny_base.family


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"'someone/some-model'.*offline.*local folder"):
        load_base("someone/some-model")


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        load_base(str(tmp_path / "x"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin"])
def test_pickled_checkpoints_are_refused(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelError, match=r"only \.safetensors"):
        load_base(str(f))


def test_corrupt_single_file_names_the_file(tmp_path):
    f = tmp_path / "broken.safetensors"
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="broken.safetensors"):
        load_base(str(f))


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_base(str(tmp_path / "nope.safetensors"))
