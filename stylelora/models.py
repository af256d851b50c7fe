"""Base models: the built-in ``tiny`` pipeline, loading from a folder / hub id / single file, family detection."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import manifest as manifests
from .errors import ModelError

log = logging.getLogger(__name__)

TINY_VERSION = "3"  # 2: ``tiny`` is the pretrained toy-world base (random SD1 one: ``tiny-random``); 3: 8-channel
# latents, and the base knows the look families (dotted, striped, outlined, faded)


@dataclass(frozen=True)
class FamilySpec:
    """Everything stylelora knows about one model family, in one place: adding a family is adding a row."""

    key: str  # short id used in metadata and compatibility checks
    arch: str  # module layout; families with one arch share weights and module shapes
    name: str  # display name in messages
    prediction_type: str
    ss_base_model_version: str  # kohya's ss_base_model_version
    ss_v2: bool  # kohya's ss_v2 flag
    modelspec_lora: str  # modelspec.architecture of a LoRA for this family
    modelspec_checkpoint: str  # ... of a whole (baked, single-file) checkpoint
    modelspec_match: str  # a modelspec.architecture starting with this names the family (longest match wins)
    lora_implementation: str  # modelspec.implementation kohya writes for a LoRA
    kohya_prefixes: tuple[tuple[str, str], ...]  # (component, kohya key prefix), UNet first
    unet_naming: str  # "diffusers" | "ldm": how kohya spells UNet module names in this family's LoRAs
    cross_attention_dim: int  # of the released model: an adapter's attn2.to_k input width names the family
    micro_conditioning: bool  # pooled text embeds + size/crop time ids as UNet inputs (SDXL)
    single_file_text_encoder: str | None  # "clip" | "open_clip": its layout in an ldm checkpoint; None: no export
    ss_version_prefix: str | None = None  # other ss_base_model_version values starting with this (sdxl_refiner...)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.kohya_prefixes if c != "unet")


_SGM = "https://github.com/Stability-AI/generative-models"  # kohya's modelspec.implementation for SDXL LoRA
_SD_PREFIXES = (("unet", "lora_unet"), ("text_encoder", "lora_te"))
_SD1 = FamilySpec(
    key="sd1", arch="sd1", name="SD1.x", prediction_type="epsilon", ss_base_model_version="sd_v1", ss_v2=False,
    modelspec_lora="stable-diffusion-v1/lora", modelspec_checkpoint="stable-diffusion-v1",
    modelspec_match="stable-diffusion-v1", lora_implementation="diffusers", kohya_prefixes=_SD_PREFIXES,
    unet_naming="diffusers", cross_attention_dim=768, micro_conditioning=False, single_file_text_encoder="clip")
_SD2 = FamilySpec(
    key="sd2", arch="sd2", name="SD2.x", prediction_type="epsilon", ss_base_model_version="sd_v2", ss_v2=True,
    modelspec_lora="stable-diffusion-v2-512/lora", modelspec_checkpoint="stable-diffusion-v2-512",
    modelspec_match="stable-diffusion-v2", lora_implementation="diffusers", kohya_prefixes=_SD_PREFIXES,
    unet_naming="diffusers", cross_attention_dim=1024, micro_conditioning=False, single_file_text_encoder="open_clip")
FAMILIES: dict[str, FamilySpec] = {s.key: s for s in (
    _SD1,
    _SD2,
    replace(_SD2, key="sd2-v", name="SD2.x (v-prediction)", prediction_type="v_prediction",
            ss_base_model_version="sd_v2_v", modelspec_lora="stable-diffusion-v2-768-v/lora",
            modelspec_checkpoint="stable-diffusion-v2-768-v", modelspec_match="stable-diffusion-v2-768-v"),
    FamilySpec(
        key="sdxl", arch="sdxl", name="SDXL", prediction_type="epsilon", ss_base_model_version="sdxl_base_v1-0",
        ss_v2=False, modelspec_lora="stable-diffusion-xl-v1-base/lora",
        modelspec_checkpoint="stable-diffusion-xl-v1-base", modelspec_match="stable-diffusion-xl",
        lora_implementation=_SGM, kohya_prefixes=(("unet", "lora_unet"), ("text_encoder", "lora_te1"),
                                                  ("text_encoder_2", "lora_te2")),
        unet_naming="ldm", cross_attention_dim=2048, micro_conditioning=True, single_file_text_encoder=None,
        ss_version_prefix="sdxl"),
)}


@dataclass(frozen=True)
class Family:
    """Model family as detected from the loaded components; its facts are its row of ``FAMILIES``."""

    arch: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"

    @property
    def key(self) -> str:
        """Short id used in metadata and compatibility checks: sd1, sd2, sd2-v, sdxl."""
        for spec in FAMILIES.values():
            if spec.arch == self.arch and spec.prediction_type == self.prediction_type:
                return spec.key
        return self.arch  # a prediction type the table has no row for: the arch's facts still apply

    @property
    def spec(self) -> FamilySpec:
        return FAMILIES[self.key]

    @classmethod
    def from_key(cls, key: str | None) -> Family | None:
        """``Family`` for a key such as ``sd2-v`` (None for None or an unknown key)."""
        spec = FAMILIES.get(key) if key else None
        return None if spec is None else cls(spec.arch, spec.prediction_type)

    @property
    def ss_base_model_version(self) -> str:
        return self.spec.ss_base_model_version

    @property
    def modelspec_architecture(self) -> str:
        return self.spec.modelspec_lora

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return self.spec.text_encoders


def compatible(a: str | None, b: str | None) -> bool:
    """Whether adapters of family key ``a`` fit a base of family key ``b``: same module layout (sd2 and sd2-v
    differ only in the scheduler's prediction type). An unknown (None) family is not refused here."""
    if a is None or b is None:
        return True
    return getattr(FAMILIES.get(a), "arch", a) == getattr(FAMILIES.get(b), "arch", b)


def family_with_component(component: str) -> Family | None:
    """The family a component implies on its own (``text_encoder_2``: SDXL), or None if several or none have it."""
    keys = [k for k, spec in FAMILIES.items() if component in spec.text_encoders]
    return Family.from_key(keys[0]) if len(keys) == 1 else None


def detect_family(pipe) -> Family:
    """Family from the loaded components (never from a file or hub name)."""
    unet = pipe.unet
    pred = getattr(pipe.scheduler.config, "prediction_type", "epsilon") or "epsilon"
    if getattr(unet.config, "addition_embed_type", None) == "text_time" and getattr(pipe, "text_encoder_2", None) is not None:
        return Family("sdxl", pred)
    te_act = getattr(getattr(pipe, "text_encoder", None), "config", None)
    te_act = getattr(te_act, "hidden_act", "quick_gelu")
    if unet.config.cross_attention_dim == FAMILIES["sd2"].cross_attention_dim or te_act == "gelu":
        return Family("sd2", pred)
    return Family("sd1", pred)


@dataclass
class Base:
    """A loaded base pipeline and what we know about it."""

    pipe: object  # diffusers StableDiffusionPipeline / StableDiffusionXLPipeline
    family: Family
    spec: str  # what the user passed to --base
    name: str  # short display name (recorded as ss_sd_model_name)
    quantize: str | None = None  # how the UNet/text encoders are stored: None (as loaded), fp8, int8, nf4


# ----------------------------------------------------------------------------------------------- tiny base
def stylelora_home() -> Path:
    return Path(os.environ.get("STYLELORA_HOME", Path.home() / ".cache" / "stylelora"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def word_merges(words) -> list[str]:
    """The BPE merges, in rank order, that make each of ``words`` one token: a chain per word (``c i``, ``ci r``,
    ... ``circl e</w>``); each merge adds one token to the vocabulary (its two halves joined).

    Known gap, kept because the committed base was trained with exactly these token ids: BPE applies the
    lowest-ranked merge first, so a longer word's merge can still split a shorter word it overlaps
    ("triangle"'s ``t r`` turns "striped" into five tokens, s|tri|p|e|d). Only "striped" is affected; fixing the
    order renumbers the vocabulary, so it waits for the next retraining of the base (TINY_VERSION).
    """
    byte_chars = _bytes_to_unicode()
    merges: list[str] = []
    # Longer words first: their merges get the lower (earlier) ranks, so a short word's merge ("r e" of "red")
    # cannot split a longer word ("green") before that word's own chain runs.
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        pieces = [byte_chars[b] for b in word.lower().encode("utf-8")]
        pieces[-1] += "</w>"
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            left += right
            if merge not in merges:
                merges.append(merge)
    return merges


def write_tiny_tokenizer(folder: Path, words: tuple[str, ...] = ()) -> None:
    """A real byte-level CLIP BPE tokenizer (vocab.json + merges.txt): 512 byte tokens, start/end, plus ``words``.

    Written by hand because the real 49408-token vocabulary needs a download; the format is CLIP's own, so
    ``CLIPTokenizer.from_pretrained`` reads it through the same code path as a real model folder. Each word in
    ``words`` gets a chain of BPE merges (``c i``, ``ci r``, ... ``circl e</w>``) so it becomes one token, as
    common words are in CLIP's real vocabulary; every other word still falls back to one token per byte.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    merges = word_merges(words)
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}), encoding="utf-8"
    )


# spec -> kind. ``tiny`` is pretrained on the toy world (stylelora/assets/tiny); the others have random weights
# and exist to test every code path fast: ``tiny-random`` is the SD1 layout, the last two are SD2-v and SDXL.
TINY = {"tiny": "toy", "tiny-random": "sd1", "tiny-sd2-v": "sd2-v", "tiny-sdxl": "sdxl"}


def _tiny_clip_config(hidden_act: str = "quick_gelu", projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act, bos_token_id=512,
                          eos_token_id=513, pad_token_id=513, projection_dim=projection_dim)


def build_tiny_components(kind: str = "sd1") -> dict:
    """Deterministic random-weight components of the given family, small enough to train on a CPU.

    sd1: SD1 layout. sd2-v: SD2 layout (linear projections, OpenCLIP-style gelu text encoder, v-prediction).
    sdxl: SDXL layout (two text encoders, pooled text embeds and size/crop time ids, ldm block layout with
    layers_per_block=2 so kohya's input_blocks/output_blocks numbering applies).
    """
    if kind == "sdxl":
        return _build_tiny_sdxl()
    if kind == "toy":
        return build_toy_components()
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8 if kind == "sd1" else (2, 4),
        use_linear_projection=kind != "sd1",
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    vae = _tiny_vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_tiny_clip_config("quick_gelu" if kind == "sd1" else "gelu"))
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon" if kind == "sd1" else "v_prediction", steps_offset=1,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


TOY_WEIGHTS = Path(__file__).resolve().parent / "assets" / "tiny" / "tiny-toy-sd1.safetensors"
# 8 latent channels, not SD's 4: the first base's 4-channel VAE (trained for minutes on a CPU) blurred dot grids
# and ink lines away; twice the channels give a VAE this small room for them. UNet and pipeline take any number.
TOY_LATENT_CHANNELS = 8


# The ``tiny`` base's tokenizer, committed beside its weights: the byte-level tokenizer plus one token per toy-world
# caption word, written by ``write_tiny_tokenizer(folder, stylelora.toy.world.vocabulary())`` (a test checks the
# committed files still equal that), so loading the base never imports the toy world.
TOY_TOKENIZER = TOY_WEIGHTS.parent / "tokenizer"


def toy_vocab_size() -> int:
    """Token count of the committed ``tiny`` tokenizer (the text encoder's embedding rows)."""
    return len(json.loads((TOY_TOKENIZER / "vocab.json").read_text(encoding="utf-8")))


def build_toy_components(pretrained: bool = True) -> dict:
    """The ``tiny`` base: an SD1-layout pipeline sized for 64 px pictures of the toy world (stylelora/toy/world.py).

    VAE: 4x downsampling (64 px -> 16 x 16 x 8 latents); UNet: three levels (32/64/128 channels) with
    cross-attention at each; CLIP text encoder: 4 layers, width 64, over the byte tokenizer plus one token per
    toy-world word. With ``pretrained`` (and the committed file present) the weights are the ones
    examples/pretrain_tiny_base.py trained; otherwise deterministic random weights of the same shapes.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=TOY_LATENT_CHANNELS, out_channels=TOY_LATENT_CHANNELS,
        block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64, attention_head_dim=2, norm_num_groups=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(24, 48, 96),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=TOY_LATENT_CHANNELS, layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
    )
    torch.manual_seed(0)
    vocab = toy_vocab_size()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=512, eos_token_id=513, pad_token_id=513,
        projection_dim=64))
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1,
    )
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}
    if pretrained:
        if not TOY_WEIGHTS.exists():
            raise ModelError(f"{TOY_WEIGHTS} is missing: the pretrained tiny base ships with the package. Reinstall "
                             "stylelora, or rebuild it with examples/pretrain_tiny_base.py")
        load_toy_weights(parts, TOY_WEIGHTS)
    return parts


def load_toy_weights(parts: dict, path: Path) -> None:
    """Load ``component.param`` tensors (stored fp16) into the fp32 modules; the file's metadata holds the VAE's
    latent scaling factor."""
    from .tensorfile import read_safetensors

    tensors, meta = read_safetensors(path, error=ModelError)
    for name in ("unet", "vae", "text_encoder"):
        state = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
        missing, unexpected = parts[name].load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ModelError(f"{path} does not fit the tiny {name}: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]} (rebuild it with examples/pretrain_tiny_base.py)")
    parts["vae"].register_to_config(scaling_factor=float(meta.get("vae.scaling_factor", 1.0)))


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=128,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
    )


def _build_tiny_sdxl() -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # 32 (CLIP-L stand-in) + 32 (OpenCLIP-G stand-in), concatenated
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 time ids x 8 + pooled text embeds (32)
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    vae = _tiny_vae()
    torch.manual_seed(0)
    te1 = CLIPTextModel(_tiny_clip_config("quick_gelu"))
    torch.manual_seed(1)
    te2 = CLIPTextModelWithProjection(_tiny_clip_config("gelu"))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading")
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2, "scheduler": scheduler}


def tiny_path(spec: str = "tiny") -> Path:
    """Where the built-in base ``spec`` is cached. The pretrained one's folder is named after its weights' digest,
    so new committed weights are never shadowed by an old cached copy."""
    suffix = f"-{_weights_digest(TOY_WEIGHTS)}" if TINY.get(spec) == "toy" else ""
    return stylelora_home() / f"{spec}-v{TINY_VERSION}{suffix}"


def _weights_digest(path: Path) -> str:
    if not path.exists():
        return "missing"
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return manifests.file_sha256(path)[:10]


TINY_MANIFEST = "stylelora-manifest.json"  # size + sha256 of every other file, written last


def ensure_tiny(spec: str = "tiny") -> Path:
    """Build the tiny base once and keep it on disk.

    Built in a temp folder and renamed into place, under a file lock so that concurrent processes (tests,
    ``accelerate launch``) build it once. Every use checks the folder against the manifest written last, so one
    damaged later (zero-byte files left by a full disk or a crash before the data reached it, an older version
    built without atomic writes) is rebuilt with a warning instead of failing every run until deleted by hand.
    Call before ``torch.distributed`` starts: transformers skips writing weights on ranks other than 0.
    """
    import fcntl

    target = tiny_path(spec)
    if _tiny_damage(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{spec}-v{TINY_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        why = _tiny_damage(target)
        if why is not None and _adopt_unlisted(target):
            return target
        if why is not None:
            if target.exists():
                log.warning("the built-in base %r in %s is damaged (%s); building it again", spec, target, why)
            _build_tiny(target, TINY[spec])
    return target


def _tiny_damage(folder: Path) -> str | None:
    """Why ``folder`` is not an intact built-in base (None if it is): checked against its manifest."""
    try:
        manifest = json.loads((folder / TINY_MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "not built" if not folder.exists() else f"{TINY_MANIFEST} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{TINY_MANIFEST} is unreadable ({e})"
    if not isinstance(manifest, dict) or not manifest:
        return f"{TINY_MANIFEST} lists no files"
    return manifests.damage(folder, manifest)


def _manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != TINY_MANIFEST)
    return manifests.record(folder, [p.relative_to(folder).as_posix() for p in files])


def _adopt_unlisted(folder: Path) -> bool:
    """A folder built before manifests existed: give it one if it looks whole (its model_index.json and every
    component config parse, no file is empty), so an upgrade does not rebuild every cached base."""
    from .atomic import write_text

    if not folder.is_dir() or (folder / TINY_MANIFEST).exists():
        return False
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        for part in index:
            if (folder / part).is_dir():
                for cfg in (folder / part).glob("*.json"):
                    json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    manifest = _manifest(folder)
    if not manifest or any(v["size"] == 0 for v in manifest.values()):
        return False
    write_text(folder / TINY_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True), fsync=True)
    return True


def _build_tiny(target: Path, kind: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from .atomic import atomic_folder

    with tempfile.TemporaryDirectory(prefix=".tiny-tok-", dir=target.parent) as tok, \
            atomic_folder(target, fsync=True) as out:
        if kind == "toy":
            shutil.copytree(TOY_TOKENIZER, tok, dirs_exist_ok=True)
        else:
            write_tiny_tokenizer(Path(tok))
        tokenizer = CLIPTokenizer.from_pretrained(tok)
        parts = build_tiny_components(kind)
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
        for part in [k for k in parts if k.startswith(("unet", "vae", "text_encoder"))]:
            if not any((out / part).glob("*.safetensors")):
                raise ModelError(f"building the tiny base wrote no weights for {part} (distributed run?)")
        (out / TINY_MANIFEST).write_text(json.dumps(_manifest(out), indent=1, sort_keys=True), encoding="utf-8")


# ----------------------------------------------------------------------------------------------- loading
def _pipeline_class(folder: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = json.loads((folder / "model_index.json").read_text())
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def _sd_kwargs(cls) -> dict:
    from diffusers import StableDiffusionPipeline

    return {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}


def load_base(spec: str, *, dtype: torch.dtype = torch.float32, base_config: str | None = None,
              quantize: str | None = None) -> Base:
    """Load ``spec``: ``tiny``, a local diffusers folder, a single-file ``.safetensors`` checkpoint, or a hub id.

    ``quantize`` (stylelora/quantize.py): ``fp8`` stores the UNet's and text encoders' Linear/Conv2d weights as
    float8 once loaded (``dtype`` becomes their compute dtype); ``nf4``/``int8`` load them through bitsandbytes
    (CUDA only; diffusers/folder and hub bases)."""
    from . import quantize as q

    q.check_available(quantize)
    spec = str(spec)
    path = Path(spec).expanduser()
    bnb = q.bnb_config(quantize, dtype) if quantize in ("nf4", "int8") else None
    if spec in TINY:
        pipe = _load_folder(ensure_tiny(spec), dtype, bnb)
        name = spec
    elif path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelError(
                f"{path} is a folder but not a diffusers pipeline (no model_index.json). Pass a diffusers folder "
                "(as written by save_pretrained / `stylelora bake`), a .safetensors checkpoint, a hub id or 'tiny'."
            )
        pipe = _load_folder(path, dtype, bnb)
        name = path.name
    elif path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin") or path.exists():
        if not path.exists():
            raise ModelError(f"base model file {path} does not exist")
        if bnb is not None:
            raise q.QuantizationError(
                f"--quantize-base {quantize} loads through diffusers' from_pretrained, which a single-file checkpoint "
                f"({path}) does not go through: convert it to a diffusers folder first (stylelora bake), or use "
                "--quantize-base fp8")
        pipe = _load_single_file(path, dtype, base_config)
        name = path.stem
    else:
        pipe = _load_hub(spec, dtype, bnb)
        name = spec
    if quantize in q.AFTER_LOAD:  # fp8, int8-torchao: quantized once loaded in full precision
        q.quantize_pipe(pipe, quantize)
    elif quantize is not None:
        pipe._stylelora_quantized = quantize
    return Base(pipe=pipe, family=detect_family(pipe), spec=spec, name=name, quantize=quantize)


def _load_folder(folder: Path, dtype: torch.dtype, quantization_config=None):
    cls = _pipeline_class(folder)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        return cls.from_pretrained(folder, dtype=dtype, **_sd_kwargs(cls), **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the diffusers pipeline in {folder}: {e}") from e


def _load_single_file(path: Path, dtype: torch.dtype, base_config: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix.lower() != ".safetensors":
        # from_single_file would unpickle .ckpt files; we refuse to run untrusted pickles.
        raise ModelError(
            f"{path}: only .safetensors single-file checkpoints are accepted (pickle-based {path.suffix} files can run "
            "code when loaded). Convert it to .safetensors first."
        )
    from .tensorfile import open_safetensors

    with open_safetensors(path, error=ModelError, floats_only=False) as f:  # checkpoints hold int position_ids
        keys = f.keys()
    cls = StableDiffusionXLPipeline if any(k.startswith("conditioner.embedders.1") for k in keys) else StableDiffusionPipeline
    kwargs = dict(dtype=dtype, **_sd_kwargs(cls))
    if base_config:
        kwargs["config"] = base_config
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises OSError/ValueError/HTTP errors for missing configs
        raise ModelError(
            f"cannot load single-file checkpoint {path}: {e}\nA single file holds weights only; diffusers also needs "
            "the model's config. Offline, pass --base-config <a diffusers folder of the same architecture>."
        ) from e


def _load_hub(repo_id: str, dtype: torch.dtype, quantization_config=None):
    from diffusers import DiffusionPipeline

    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, dtype=dtype, safety_checker=None, **extra)
    except Exception as e:  # noqa: BLE001 - offline / unknown repo errors come in many types
        raise ModelError(
            f"cannot load base model '{repo_id}': it is not 'tiny', an existing folder or file, and loading it as a "
            f"model-hub id failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). If this machine "
            "is offline, download the model elsewhere and pass its local folder or .safetensors file."
        ) from e
    return pipe
