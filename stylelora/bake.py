"""Bake a blend into a model: a diffusers folder (``save_pretrained``) or one original-layout ``.safetensors`` file.

The blend is already fused into the weights by the Blender (W₀ + Σ cᵢ BᵢAᵢ, exact), so baking is saving. Both
outputs are written next to their destination and renamed into place, so a failed bake never leaves half a model.
Learnt trigger tokens of the blended adapters are in the pipeline's tokenizer(s) and text encoder(s) while they are
blended, so the folder output carries them; a single original-layout file cannot (see ``save_single_file``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_folder, atomic_path
from .blend import Blender
from .errors import ConfigError, ModelError
from .models import FAMILIES
from .prompt import LoraRef

BAKE_INFO = "stylelora_bake.json"


def blend_record(blender: Blender) -> list[dict]:
    """The active adapters as [{name, sshs_model_hash, weight, [blocks,] file}] (weight: number, or {unet,
    text_encoder}; blocks: the block-weight preset or values, as after ``lbw=``)."""
    rows = []
    blocks = blender.blocks
    for name, (unet, te) in blender.active().items():
        loaded = blender.loaded[name]
        rows.append({"name": name, "sshs_model_hash": loaded.model_hash,
                     "weight": unet if unet == te else {"unet": unet, "text_encoder": te},
                     **({"blocks": blocks[name].text()} if name in blocks else {}),
                     "file": str(loaded.path) if loaded.path else None})
    return rows


def token_record(blender: Blender) -> dict[str, dict]:
    """The trigger words in the blend now: {word: {adapter, tokens (the added token strings)}}."""
    out = {}
    for word, name in blender.trigger_words().items():
        emb = blender.loaded[name].adapter.embeddings[word]
        out[word] = {"adapter": name, "tokens": emb.tokens()}
    return out


def _check_plain(pipe) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for comp in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, comp, None)
        if module is not None and any(isinstance(m, BaseTunerLayer) for m in module.modules()):
            raise ModelError(f"the pipeline's {comp} still holds PEFT LoRA layers; bake from a plain base with a "
                             "Blender (fused weights), not from a pipeline with attached adapters")


def _check_full_precision(pipe) -> None:
    """A baked model is the base's weights with the blend fused in, so it needs them in full precision. A quantized
    base keeps its weights elsewhere (fp8: ``weight_fp8``/``weight_scale`` buffers, the blend held apart as factors;
    bitsandbytes: packed bytes), and ``save_pretrained`` would write those instead of ``weight``: a folder no
    reader of SD models can load, and without the blend."""
    from .quantize import quantization

    mode = quantization(pipe)
    if mode is not None:
        raise ModelError(f"cannot bake from a base loaded with --quantize-base {mode} (quantize={mode!r}): its "
                         "weights are stored quantized, not as the model's own tensors; load the base without "
                         "--quantize-base (load_base(..., quantize=None)) to bake")


def check_output(output: str | Path, *, single_file: bool = False, overwrite: bool = False,
                 base_spec: str | None = None) -> None:
    """Refuse a bad or existing destination before any slow work, and always one that would replace the base
    model being read (``base_spec``: its folder or file), whatever ``overwrite`` says."""
    from .atomic import check_output as refuse_inputs

    output = Path(output)
    if single_file and output.suffix.lower() != ".safetensors":
        raise ConfigError(f"--single-file output must end in .safetensors, got {output.name}")
    base_path = Path(base_spec).expanduser() if base_spec else None
    refuse_inputs(output, [base_path] if base_path is not None and base_path.exists() else [], overwrite=True)
    _prepare(output, overwrite, create=False)


def _prepare(output: Path, overwrite: bool, create: bool = True) -> None:
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists; pass --overwrite (overwrite=True) to replace it")
    if create:
        output.parent.mkdir(parents=True, exist_ok=True)


def save_folder(blender: Blender, output: str | Path, *, base_name: str = "", overwrite: bool = False) -> Path:
    """Write the pipeline with the current blend fused in as a diffusers folder (atomic rename into place)."""
    output = Path(output)
    _check_full_precision(blender.pipe)
    _prepare(output, overwrite)
    _check_plain(blender.pipe)
    with atomic_folder(output) as tmp:
        blender.pipe.save_pretrained(tmp, safe_serialization=True)
        info = {"base": base_name, "family": blender.family, "adapters": blend_record(blender),
                "trigger_tokens": token_record(blender), "stylelora_version": __version__}
        (tmp / BAKE_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        _usual_modes(tmp)
    return output


def _umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux); else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(path: Path) -> None:
    """Give every file 0666 and folder 0777 minus the umask (0644/0755 usually), as our adapter files get:
    safetensors writes its files 0600, so a baked model was unreadable to the other users of a shared machine."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def save_single_file(blender: Blender, output: str | Path, *, dtype: torch.dtype | None = None, base_name: str = "",
                     overwrite: bool = False) -> Path:
    """Write one ``.safetensors`` checkpoint in the original SD (ldm) key layout, blend fused in."""
    from safetensors.torch import save_file

    from .ldm import pipeline_to_ldm

    output = Path(output)
    check_output(output, single_file=True, overwrite=overwrite)
    _check_full_precision(blender.pipe)
    _check_tokens_fit_single_file(blender)
    _prepare(output, overwrite)
    _check_plain(blender.pipe)
    state = pipeline_to_ldm(blender.pipe, blender.family)
    state = {k: (v.to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.to("cpu")).contiguous()
             for k, v in state.items()}
    metadata = {"modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": FAMILIES[blender.family].modelspec_checkpoint,
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.title": output.stem, "stylelora_base": base_name,
                "stylelora_baked_from": json.dumps(blend_record(blender))}
    with atomic_path(output) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        _usual_modes(tmp)
    return output


def _check_tokens_fit_single_file(blender: Blender) -> None:
    """An original-layout checkpoint holds no tokenizer, and the tools that read it (A1111, ComfyUI, diffusers'
    from_single_file) build the text encoder with CLIP's fixed 49408-row token table, so added rows would be a shape
    error there and the words would have no token to name them: refuse rather than write such a file."""
    words = blender.trigger_words()
    if words:
        listing = ", ".join(f"{w!r} ({n})" for w, n in words.items())
        raise ConfigError(f"the blend has learnt trigger tokens ({listing}), which a single-file checkpoint cannot "
                          "hold: it has no tokenizer, and its readers expect CLIP's fixed token table. Bake to a "
                          "folder instead (leave out --single-file), or keep the adapter as a LoRA and load its "
                          "<name>_emb.safetensors sidecar as an embedding next to the checkpoint")


def bake(base, refs: list[LoraRef], output: str | Path, *, folders=(), single_file: bool = False,
         dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Load ``refs`` onto ``base`` (a models.Base), fuse them at their weights and save the result."""
    if not refs:
        raise ConfigError("bake needs at least one --lora FILE[:W[:W_TE]][@BLOCKS]")
    check_output(output, single_file=single_file, overwrite=overwrite, base_spec=getattr(base, "spec", None))
    _check_full_precision(base.pipe)  # before any adapter is loaded
    blender = Blender(base)
    blender.set(blender.load_refs(refs, folders))
    if single_file:
        return save_single_file(blender, output, dtype=dtype, base_name=base.name, overwrite=overwrite)
    return save_folder(blender, output, base_name=base.name, overwrite=overwrite)
