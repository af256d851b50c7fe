"""What a run reports and leaves behind for the user: the effective recipe, the dataset summary before training,
--save-every adapters, and listings that never show a run's checkpoint or sample folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_style_images
from stylelora import data
from stylelora.config import TrainConfig


def test_summary_names_the_recipe_and_exactly_the_changed_fields():
    cfg = TrainConfig().replace(rank=4, lr=3e-4, trigger="zz", steps=7)
    assert cfg.differences() == {"trigger": "zz", "rank": 4, "lr": 3e-4, "steps": 7}
    text = cfg.summary("quick")
    assert text.splitlines()[0] == "recipe: quick"
    for shown in ("trigger='zz'", "rank=4", "lr=0.0003", "steps=7"):
        assert shown in text
    assert "batch_size" not in text and "resolution" not in text  # unchanged fields stay out
    assert "no field differs" in TrainConfig().summary()


def _dataset(folder: Path) -> Path:
    """4 stripe images (2 captioned, 128x128 and 192x128), one 32x32 without a caption, one broken file."""
    make_style_images(folder, n=4)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "small.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def test_dataset_summary_counts_captions_buckets_resizes_and_skips(tmp_path):
    folder = _dataset(tmp_path / "set")
    report = {}
    with pytest.warns(UserWarning, match="skipped 1"):
        items = data.scan_folder(folder, trigger="zz", skip_bad_images=True, report=report, default_repeats=3)
    s = data.summarize(items, resolution=64, **report)
    # at 64 px every picture goes to the one 64x64 bucket: the four stripe images (128 and 192 px wide) shrink,
    # the 32x32 one is enlarged (the one-step minimum side); img1, img3 and small.png have no caption file
    assert (s.images, s.captioned, s.uncaptioned, s.reg_images) == (5, 2, 3, 0)
    assert s.buckets == {(64, 64): 5} and (s.upscaled, s.downscaled) == (1, 4)
    assert s.repeats == {3: 5} and s.samples_per_epoch == 15
    assert [name for name, _ in s.skipped] == ["broken.png"] and str(tmp_path) not in s.format()
    text = s.format()
    assert "5 image(s), 2 with a caption file; 3 without one" in text and "64x64: 5" in text


def _adapter_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x_to_q.lora_down.weight": torch.zeros(1, 4),
               "lora_unet_x_to_q.lora_up.weight": torch.zeros(4, 1)}, str(path))


def test_checkpoint_and_sample_folders_are_not_adapters(tmp_path):
    from stylelora.prompt import available_adapters
    from stylelora.webui.library import Library

    root = tmp_path / "loras"
    _adapter_file(root / "a.safetensors")
    _adapter_file(root / "a-step-2.safetensors")
    _adapter_file(root / "a-checkpoints" / "step-000002" / "lora.safetensors")
    _adapter_file(root / "a-samples" / "odd.safetensors")
    _adapter_file(root / "sub" / "b.safetensors")
    want = {"a", "a-step-2", "sub/b"}
    assert {p.relative_to(root).with_suffix("").as_posix() for p in available_adapters([root]).values()} == want
    assert set(Library(root, tmp_path / "thumbs").files()) == want


def test_cli_prints_recipe_and_dataset_then_save_every_writes_loadable_adapters(tmp_path, capsys):
    from stylelora.cli import main
    from stylelora.formats import load_adapter

    folder = _dataset(tmp_path / "set")
    out = tmp_path / "run" / "st.safetensors"
    rc = main(["train", str(folder), "-o", str(out), "--recipe", "quick", "--base", "tiny-random",
               "--trigger", "zz", "--resolution", "64", "--steps", "3", "--batch-size", "2", "--save-every", "1",
               "--skip-bad-images", "--no-cache-latents", "--threads", "1"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert stdout.index("recipe: quick") < stdout.index("dataset: 5 image(s)") < stdout.index("wrote ")
    assert "save_every=1" in stdout and "broken.png" in stdout
    written = sorted(p.name for p in out.parent.glob("*.safetensors"))
    assert written == ["st-step-1.safetensors", "st-step-2.safetensors", "st.safetensors"]  # the last is the output
    for step in (1, 2):
        path = out.parent / f"st-step-{step}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["ss_steps"] == str(step) and meta["ss_max_train_steps"] == "3"
        assert keys and all(k.startswith(("lora_unet_", "lora_te")) for k in keys)  # kohya layout
        assert load_adapter(path).modules  # loadable by our own reader
    # the adapter of step 2 differs from the final one (step 3): it is the state of its step, not a copy
    with safe_open(str(out.parent / "st-step-2.safetensors"), "pt") as a, safe_open(str(out), "pt") as b:
        ups = [k for k in a.keys() if k.endswith("lora_up.weight")]
        assert ups and any(not torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in ups)
