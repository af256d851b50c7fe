"""Text-to-image with a blend of adapters, and PNGs that carry their generation parameters A1111-style.

The ``parameters`` PNG text chunk follows AUTOMATIC1111's infotext (modules/processing.py ``create_infotext``):
the prompt, an optional ``Negative prompt: …`` line, then ``Key: value`` pairs joined by ", ", with values that
contain ',', ':' or a newline JSON-quoted. LoRA weights live in the prompt as ``<lora:name:w>`` tags (appended for
adapters given with --lora, as A1111 does for its default LoRA) and ``Lora hashes`` lists ``alias: hash12``.
Block weights are written as the LoRA Block Weight extension reads them: ``<lora:name:w:lbw=INS>`` (a preset name,
or the 12/17/20/26 values), so reading the prompt back makes the same blend.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_path
from .blend import Blender
from .blocks import BlockWeight
from .errors import ConfigError
from .prompt import LoraRef, parse_prompt
from .quantize import quantization

# our name -> (diffusers scheduler class, from_config overrides, A1111 sampler name, A1111 schedule type)
SAMPLERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, "DPM++ 2M", None),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M", "Karras"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler", None),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a", None),
    "heun": ("HeunDiscreteScheduler", {}, "Heun", None),
    "ddim": ("DDIMScheduler", {}, "DDIM", None),
    "pndm": ("PNDMScheduler", {}, "PLMS", None),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC", None),
}


@dataclass
class Settings:
    """What to generate; ``width``/``height`` default to the base model's native size."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    guidance: float = 7.0
    width: int | None = None
    height: int | None = None
    sampler: str | None = None  # a SAMPLERS key; None keeps the pipeline's scheduler
    num_images: int = 1  # image i uses seed + i, so any image can be redone alone

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.num_images < 1:
            raise ConfigError(f"--num-images must be >= 1, got {self.num_images}")
        for v in (self.width, self.height):
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"width and height must be multiples of 8 (>= 8), got {v}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")


def set_sampler(pipe, sampler: str) -> None:
    """Swap the pipeline's scheduler for ``sampler``, keeping its training config (betas, prediction type)."""
    import diffusers

    cls_name, overrides, _, _ = SAMPLERS[sampler]
    # Karras sigmas are a choice of sampler, not of the model: do not carry them over from the old scheduler.
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "use_karras_sigmas"}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)


def sampler_label(scheduler) -> tuple[str, str | None]:
    """(A1111 sampler name, schedule type) for a diffusers scheduler instance."""
    name = type(scheduler).__name__
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for cls_name, overrides, label, schedule in SAMPLERS.values():
        if cls_name == name and overrides.get("use_karras_sigmas", karras) == karras:
            return label, "Karras" if karras else schedule
    return name, "Karras" if karras else None


def quote(value) -> str:
    """A1111's infotext quoting: values containing ',', ':' or a newline become JSON strings."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _num(x: float) -> str:
    return f"{x:g}"


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """``prompt\\nNegative prompt: …\\nKey: value, …`` (None values are left out)."""
    fields = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{fields}"


_PARAM = re.compile(r'\s*([\w][\w \-/]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Read an A1111 infotext back: {"Prompt", "Negative prompt", and each Key: value} (quoted values unquoted)."""
    lines = text.strip().split("\n")
    last = lines.pop() if lines and _PARAM.match(lines[-1]) and len(_PARAM.findall(lines[-1])) >= 2 else ""
    prompt, negative, into_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if into_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out


def lora_hashes(blender: Blender | None) -> str | None:
    """``alias: hash12, …`` for the active adapters, as A1111's ``Lora hashes`` field."""
    if blender is None:
        return None
    items = [f"{n.replace(':', '').replace(',', '')}: {blender.loaded[n].model_hash[:12]}" for n in blender.active()]
    return ", ".join(items) or None


def prompt_with_tags(prompt: str, blender: Blender | None) -> str:
    """The prompt as written, plus a ``<lora:…>`` tag for each active adapter it does not mention already."""
    if blender is None:
        return prompt
    _, tagged = parse_prompt(prompt)
    mentioned = {r.source for r in tagged}
    blocks = blender.blocks
    extra = [LoraRef(n, u, t, blocks.get(n)).tag(n) for n, (u, t) in blender.active().items() if n not in mentioned]
    return " ".join([prompt, *extra]) if extra else prompt


def apply_prompt_tags(prompt: str, blender: Blender | None, pipe, folders=()) -> tuple[str, Blender | None]:
    """Strip ``<lora:…>`` tags, load what they name (already-loaded names first, then ``folders``), set weights."""
    clean, refs = parse_prompt(prompt)
    if not refs:
        return clean, blender
    blender = blender if blender is not None else Blender(pipe)
    weights = {}
    for ref in refs:
        name = ref.source if ref.source in blender.loaded else blender.load_refs([ref], folders).popitem()[0]
        weights[name] = BlockWeight(ref.weights, ref.blocks) if ref.blocks is not None else ref.weights
    blender.update(weights)
    return clean, blender


def generate(base, settings: Settings, blender: Blender | None = None, *, folders=(),
             model_name: str | None = None):
    """Generate ``settings.num_images`` images; each carries its infotext in ``image.info["parameters"]``.

    ``base`` is a models.Base or a pipeline. Prompt tags ``<lora:name:w>`` update ``blender`` (one is created when
    needed) for the named adapters, looking names up among loaded adapters, then in ``folders``.
    """
    pipe = getattr(base, "pipe", base)
    model_name = model_name or getattr(base, "name", None) or type(pipe).__name__
    if settings.sampler:
        set_sampler(pipe, settings.sampler)
    clean, blender = apply_prompt_tags(settings.prompt, blender, base, folders)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = settings.width or native, settings.height or native
    sampler, schedule = sampler_label(pipe.scheduler)
    shown_prompt = prompt_with_tags(settings.prompt, blender)
    images = []
    for i in range(settings.num_images):
        seed = settings.seed + i
        # A CPU generator gives the same starting noise on every device.
        generator = torch.Generator("cpu").manual_seed(seed)
        image = pipe(clean, negative_prompt=settings.negative_prompt or None, num_inference_steps=settings.steps,
                     guidance_scale=settings.guidance, width=width, height=height, generator=generator).images[0]
        image.info["parameters"] = infotext(shown_prompt, settings.negative_prompt, {
            "Steps": settings.steps, "Sampler": sampler, "Schedule type": schedule,
            "CFG scale": _num(settings.guidance), "Seed": seed, "Size": f"{width}x{height}", "Model": model_name,
            "Quantized base": quantization(pipe),  # None (left out) for a full-precision base
            "Lora hashes": lora_hashes(blender), "Version": f"stylelora {__version__}",
        })
        images.append(image)
    return images


def save_png(image, path: str | Path) -> Path:
    """Write ``image`` as PNG with its ``parameters`` text chunk (temp file + rename)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    if image.info.get("parameters"):
        info.add_text("parameters", image.info["parameters"])
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def output_paths(output: str | Path, n: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, … for several."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ConfigError(f"-o must name a .png file, got {output.name}")
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]
