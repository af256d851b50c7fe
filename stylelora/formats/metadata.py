"""Metadata a trained adapter carries: kohya ``ss_*`` keys, ModelSpec, and stylelora's own config.

The ``ss_*`` keys follow kohya's train_network.py (values are strings; JSON where kohya writes JSON), so
AUTOMATIC1111 shows the alias, hash, resolution and tag chips, and kohya's tools read the network settings.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
from pathlib import Path

from ..models import Family

MODELSPEC_VERSION = "1.0.1"


def stylelora_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("stylelora")
    except (ImportError, PackageNotFoundError):
        import stylelora

        return str(getattr(stylelora, "__version__", "0+unknown"))


def _dir_name(subset: str, folder: str) -> str:
    """kohya keys datasets by folder name; the image folder itself (subset ".") by its own name."""
    return (Path(folder).name or ".") if subset in ("", ".") else subset


def tag_frequency(items, folder: str) -> dict[str, dict[str, int]]:
    """{folder: {tag: images whose caption has the tag}}, tags being the comma-separated parts of a caption."""
    freq: dict[str, dict[str, int]] = {}
    for item in items:
        counts = freq.setdefault(_dir_name(item.subset, folder), {})
        for tag in dict.fromkeys(t.strip() for t in item.caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return freq


def dataset_dirs(items, folder: str) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs``: {folder: {"n_repeats": repeats, "img_count": images}}."""
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        d = dirs.setdefault(_dir_name(item.subset, folder), {"n_repeats": int(item.repeats), "img_count": 0})
        d["n_repeats"] = max(d["n_repeats"], int(item.repeats))
        d["img_count"] += 1
    return dirs


def thumbnail_data_url(image, size: int = 256) -> str:
    """A small JPEG of a PIL image as a ``data:`` URL (ModelSpec's thumbnail)."""
    from PIL import Image

    im = image.copy()
    if im.mode not in ("RGB", "L"):  # flatten transparency onto white; JPEG has no alpha
        background = Image.new("RGB", im.size, (255, 255, 255))
        im = im.convert("RGBA")
        background.paste(im, mask=im.getchannel("A"))
        im = background
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _lr(value) -> str:
    return "None" if value is None else str(value)


def training_metadata(config, family: Family, *, items: list, base_name: str, steps: int, epoch: int,
                      started_at: float, finished_at: float, thumbnail=None) -> dict[str, str]:
    """Everything a trained adapter file records about how it was made (all values are strings)."""
    net, opt, run, data = config.network, config.optim, config.run, config.data
    res = int(data.resolution)
    te_lr = (opt.lr if opt.te_lr is None else opt.te_lr) if net.train_text_encoder else None
    title = Path(run.output).stem
    md = {
        # kohya minimum
        # a DoRA file is LyCORIS' (lycoris.kohya, algo lora + dora_wd): sd-scripts' networks.lora has no DoRA
        "ss_network_module": "lycoris.kohya" if net.network == "dora" else "networks.lora",
        "ss_network_dim": str(int(net.rank)),
        "ss_network_alpha": str(float(net.lora_alpha)),
        "ss_network_dropout": str(float(net.dropout)),
        "ss_network_args": json.dumps({}),
        "ss_v2": str(family.spec.ss_v2),
        "ss_v_parameterization": str(family.prediction_type == "v_prediction"),
        "ss_base_model_version": family.ss_base_model_version,
        # run
        "ss_output_name": title,
        "ss_sd_model_name": str(base_name),
        "ss_resolution": f"({res}, {res})",
        "ss_steps": str(int(steps)),
        "ss_max_train_steps": str(int(run.steps)),
        "ss_epoch": str(int(epoch)),
        "ss_num_train_images": str(sum(int(i.repeats) for i in items)),
        "ss_tag_frequency": json.dumps(tag_frequency(items, data.folder)),
        "ss_dataset_dirs": json.dumps(dataset_dirs(items, data.folder)),
        "ss_learning_rate": str(opt.lr),
        "ss_unet_lr": _lr(opt.lr if net.unet_targets else None),
        "ss_text_encoder_lr": _lr(te_lr),
        "ss_network_train_unet_only": str(not net.train_text_encoder),
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_lr_warmup_steps": str(opt.warmup_steps),
        "ss_optimizer": opt.optimizer,
        "ss_max_grad_norm": str(opt.max_grad_norm),
        "ss_min_snr_gamma": _lr(opt.min_snr_gamma),
        "ss_noise_offset": str(opt.noise_offset),
        "ss_batch_size_per_device": str(run.batch_size),
        "ss_gradient_accumulation_steps": str(run.grad_accum),
        "ss_gradient_checkpointing": str(run.gradient_checkpointing),
        "ss_mixed_precision": run.mixed_precision,
        "ss_flip_aug": str(data.random_flip),
        "ss_seed": str(run.seed),
        "ss_clip_skip": "None",
        "ss_training_started_at": str(float(started_at)),
        "ss_training_finished_at": str(float(finished_at)),
        # ModelSpec
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.spec.lora_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished_at)).isoformat(),
        "modelspec.prediction_type": "v" if family.prediction_type == "v_prediction" else "epsilon",
        # stylelora
        "stylelora.version": stylelora_version(),
        "stylelora.family": family.key,
        "stylelora.format": run.format,
        "stylelora.config": config.to_json(),
    }
    if run.quantize_base:  # trained on a quantized frozen base (QLoRA); read by quantize.check_adapter
        md["stylelora.quantize_base"] = run.quantize_base
    if data.trigger:
        md["modelspec.trigger_phrase"] = data.trigger
    if thumbnail is not None:
        md["modelspec.thumbnail"] = thumbnail_data_url(thumbnail)
    return md
