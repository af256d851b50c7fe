"""Train tab handlers (no Gradio): the new fields reach the config, the status shows the recipe and the dataset
without server paths, Stop -> "save what was learnt so far" -> Resume, and the loss plot / sample captions."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from conftest import make_style_images
from stylelora.errors import ConfigError
from stylelora.webui import Studio, TrainRequest
from stylelora.webui.training import build_config, check_request, format_status, loss_frame, sample_caption


class _Base:  # what build_config reads of a base
    spec = "tiny-random"

    class pipe:  # noqa: N801
        class unet:  # noqa: N801
            dtype = "torch.float32"


def test_new_fields_reach_the_config(tmp_path):
    req = TrainRequest(name="x", trigger="zz", preset="quick", train_text_encoder=True, te_lr=5e-5, batch_size=2,
                       alpha=4.0, caption_dropout=0.1, lr_scheduler="cosine", skip_bad_images=True,
                       sample_prompts="zz, a red house, at night\n\n  zz, a tree  \n")
    cfg = build_config(req, tmp_path, tmp_path / "x.safetensors", base=_Base, native=64, reg_folder=tmp_path / "r")
    got = {k: cfg.get(k) for k in ("train_text_encoder", "te_lr", "batch_size", "alpha", "caption_dropout",
                                   "lr_scheduler", "skip_bad_images", "sample_prompts", "reg_folder")}
    assert got == {"train_text_encoder": True, "te_lr": 5e-5, "batch_size": 2, "alpha": 4.0, "caption_dropout": 0.1,
                   "lr_scheduler": "cosine", "skip_bad_images": True,
                   "sample_prompts": ["zz, a red house, at night", "zz, a tree"],  # one per line, commas kept
                   "reg_folder": str(tmp_path / "r")}
    plain = build_config(TrainRequest(name="x", preset="quick"), tmp_path, tmp_path / "x.safetensors", base=_Base,
                         native=64)
    assert plain.network.train_text_encoder is False and plain.run.batch_size == 1 and plain.network.alpha is None
    for bad, match in ((dict(batch_size=1000), "batch size"), (dict(lr_scheduler="bogus"), "scheduler"),
                       (dict(caption_dropout=1.5), "caption dropout"), (dict(te_lr=float("nan")), "text-encoder")):
        with pytest.raises(ConfigError, match=match):
            check_request(TrainRequest(name="x", **bad), native=64)


def test_orthogonal_slot_reaches_the_config_and_bad_slots_are_refused(tmp_path):
    def config(**kw):
        return build_config(TrainRequest(name="x", preset="quick", **kw), tmp_path, tmp_path / "x.safetensors",
                            base=_Base, native=64)

    assert config(slot=3).network.slot == 3 and config(slot=0).network.slot == 0
    assert config().network.slot is None  # empty field: off
    for bad in (-1, 1.5, 1024, float("nan"), True):
        with pytest.raises(ConfigError, match="orthogonal slot .empty = off. must be a whole number from 0 to 1023"):
            config(slot=bad)


def test_loss_frame_and_sample_caption(tmp_path):
    frame = loss_frame({"losses": [(1, 0.5), (2, 0.25)]})
    assert list(frame.columns) == ["step", "loss"] and frame["loss"].tolist() == [0.5, 0.25]
    assert loss_frame(None).empty
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "zz, a red house\nSteps: 2, Seed: 1")
    Image.new("RGB", (8, 8)).save(tmp_path / "s.png", pnginfo=info)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert sample_caption(str(tmp_path / "s.png")) == "zz, a red house"
    assert sample_caption(str(tmp_path / "plain.png")) == "plain.png"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from stylelora.models import load_base

    root = tmp_path_factory.mktemp("traintab")
    make_style_images(root / "datasets" / "stripes")
    (root / "datasets" / "stripes" / "broken.png").write_bytes(b"not an image")
    make_style_images(root / "datasets" / "plain", n=2, captions=False)
    (root / "loras").mkdir()
    s = Studio(load_base("tiny-random"), root / "loras", [root / "datasets"], work_dir=root / "work")
    yield s
    s.close()


def test_stop_save_what_was_learnt_then_resume(studio):
    folders = {Path(f).name: f for f in studio.image_folders()}
    req = TrainRequest(name="tab", folder=folders["stripes"], reg_folder=folders["plain"], trigger="strp",
                       preset="quick", steps=6, resolution=64, sample_every=0, sample_steps=2, batch_size=2,
                       skip_bad_images=True, sample_prompts="strp, a lighthouse")
    job = studio.start_training(req)
    job.stop()  # polled every step: stops after the first
    status = job.join(timeout=600)
    assert status["status"] == "stopped", status
    text = format_status(status)
    assert "recipe: quick" in text and "batch_size=2" in text
    assert "dataset: 4 image(s)" in text and "2 regularization image(s)" in text and "broken.png" in text
    assert str(studio.work_dir) not in text and str(Path(folders["stripes"]).parent) not in status["dataset"]
    assert "tab" not in studio.adapters()
    step = status["step"]
    saved = studio.save_stopped().join(timeout=600)
    assert saved["status"] == "done", saved
    name = f"tab-step-{step}"
    assert name in studio.adapters() and "tab" not in studio.adapters()
    with safe_open(str(studio.library.files()[name]), "pt") as f:
        assert f.metadata()["ss_steps"] == str(step)
    done = studio.resume_stopped().join(timeout=600)
    assert done["status"] == "done", done
    assert "tab" in studio.adapters()
    with safe_open(str(studio.library.files()["tab"]), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"
    assert not any(k.endswith(("-checkpoints", "-samples")) for k in studio.adapters())
    with pytest.raises(ConfigError, match="no stopped"):
        studio.resume_stopped()


def test_orthogonal_slot_that_does_not_fit_is_refused_as_train_refuses_it(studio):
    import stylelora
    from stylelora.orthogonal import slot_rows

    folders = {Path(f).name: f for f in studio.image_folders()}
    req = TrainRequest(name="slotted", folder=folders["stripes"], trigger="strp", preset="quick", steps=1, rank=4,
                       resolution=64, sample_every=0, sample_steps=2, skip_bad_images=True)
    # tiny-random's layers take 32 inputs: slots 0..7 fit at rank 4; slot 8 is refused before any run starts,
    # with the message train() itself gives (the reference: the same config trained directly)
    config = build_config(TrainRequest(**{**req.__dict__, "slot": 8}), Path(folders["stripes"]),
                          studio.work_dir / "direct.safetensors", base=studio.base, native=studio.native_size)
    with pytest.raises(ConfigError) as direct:
        stylelora.train(config)
    assert "slot 8 at rank 4 needs 36 input dimensions" in str(direct.value)
    def runs():
        return set((studio.work_dir / "train").glob("*"))

    before = runs()
    with pytest.raises(ConfigError) as page:
        studio.start_training(TrainRequest(**{**req.__dict__, "slot": 8}))
    assert str(page.value) == str(direct.value)
    assert studio.job is None or studio.job.name != "slotted"
    assert runs() == before  # no run folder left behind
    # slot 7 fits: the adapter's lora_down rows are the slot's rows of each layer's fixed basis
    done = studio.start_training(TrainRequest(**{**req.__dict__, "slot": 7})).join(timeout=600)
    assert done["status"] == "done", done
    from stylelora.formats import load_adapter

    adapter = load_adapter(studio.library.files()["slotted"], pipe=studio.base.pipe)
    path, m = next(iter(adapter.modules["unet"].items()))
    want = slot_rows(f"unet.{path}", m.down[0].numel(), 4, 7)
    assert m.down.double().flatten(1).sub(want).abs().max() < 1e-6
