"""Blend several LoRA adapters into a pipeline's weights: W = W₀ + Σᵢ wᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ, fused, and exactly undoable.

The fused path costs nothing per denoising step. Each touched layer keeps a pristine copy of W₀; every update
recomputes W from that copy (never by subtracting, which drifts), so all-zero weights give back W₀ bit for bit.
Only layers whose coefficients changed are rewritten, and adapter files are read once per content (sha256).

Learnt trigger tokens (``Adapter.embeddings``) follow the same rule: an adapter's words are in the tokenizer(s) and
their vectors in the text encoder(s) while the adapter is part of the blend (a nonzero weight), and are taken out
when its weight goes back to 0 or it is unloaded, so an all-zero blend is the base model exactly, tokenizer included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, LycoModule, TokenEmbedding
from .blocks import Blocks, BlockWeight, block_of, check_fit, split_weight
from .errors import AdapterError
from .models import compatible  # which families' adapters fit which bases: read from the FAMILIES table

log = logging.getLogger(__name__)

Weight = float | tuple[float, float]  # one number for UNet and text encoder, or (unet, text_encoder)
# Weights are clamped to +-MAX_WEIGHT with a warning, the same for --lora, <lora:...> tags, merge, the Python API
# and the web UI (whose sliders end there): far past it a LoRA only gives noise, and a typo (100 for 1.00) should
# not run silently.
MAX_WEIGHT = 4.0

_CACHE_SIZE = 16
_ADAPTERS: OrderedDict[tuple[str, str], Adapter] = OrderedDict()  # (file sha256, model signature) -> Adapter
_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}  # (realpath, size, mtime_ns) -> (sha256, model hash)


def family_key(family) -> str | None:
    """Family as its short key ("sd1", "sd2", "sd2-v", "sdxl") from a Family, a key or None."""
    return getattr(family, "key", family)


def file_digests(path: str | Path) -> tuple[str, str]:
    """(sha256 of the whole file, sha256 of the bytes after the safetensors header = A1111/kohya model hash).

    A tensor pickle has no header: its second digest is the whole file's. Only the header's length is read
    (checked by the one safetensors reader); the hashes cover raw bytes, so no tensor is decoded.
    """
    from .formats.io import PICKLE_SUFFIXES
    from .tensorfile import header_length

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    pickled = path.suffix.lower() in PICKLE_SUFFIXES
    data_start = 0 if pickled else 8 + header_length(path)
    whole, body = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        whole.update(f.read(data_start))
        while chunk := f.read(1 << 20):
            whole.update(chunk)
            body.update(chunk)
    _DIGESTS[key] = (whole.hexdigest(), body.hexdigest())
    return _DIGESTS[key]


def model_signature(pipe) -> str:
    """A short id of a pipeline's architecture: adapters read for one base are keyed by its module names."""
    if pipe is None:
        return "no-base"
    configs = [dict(pipe.unet.config)]
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            # vocab_size grows while trigger tokens are in: it is not part of what an adapter is read against
            configs.append({k: v for k, v in module.config.to_dict().items() if k != "vocab_size"})
    return hashlib.sha1(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()


def read_adapter(path: str | Path, *, pipe=None) -> Adapter:
    """Read an adapter file once per content and base architecture; later calls return the cached (shared) copy."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file {path} does not exist")
    sha, _ = file_digests(path)
    key = (sha, model_signature(pipe))
    if key in _ADAPTERS:
        _ADAPTERS.move_to_end(key)
        return _ADAPTERS[key]
    try:
        from .formats import load_adapter
    except ImportError as e:  # pragma: no cover - formats ships with the package
        raise AdapterError(f"cannot read {path}: stylelora.formats is unavailable ({e})") from e
    adapter = load_adapter(path, pipe=pipe)
    _ADAPTERS[key] = adapter
    while len(_ADAPTERS) > _CACHE_SIZE:
        _ADAPTERS.popitem(last=False)
    return adapter


def as_pair(weight: Weight, what: str = "weight") -> tuple[float, float]:
    """``w`` -> (w, w); ``(w_unet, w_te)`` -> itself; checks the numbers are finite."""
    if isinstance(weight, (int, float)):
        pair = (float(weight), float(weight))
    elif isinstance(weight, (tuple, list)) and len(weight) == 2:
        pair = (float(weight[0]), float(weight[1]))
    else:
        raise AdapterError(f"{what}: expected a number or (unet, text_encoder), got {weight!r}")
    if not all(math.isfinite(w) for w in pair):
        raise AdapterError(f"{what}: weights must be finite, got {weight!r}")
    clamped = tuple(max(-MAX_WEIGHT, min(MAX_WEIGHT, w)) for w in pair)
    if clamped != pair:
        log.warning("%s: %s is outside -%g..%g; using %s", what, ", ".join(f"{w:g}" for w in pair), MAX_WEIGHT,
                    MAX_WEIGHT, ", ".join(f"{w:g}" for w in clamped))
    return clamped


@dataclass
class Loaded:
    """One adapter held by a Blender, with where it came from (for infotext and merge metadata)."""

    adapter: Adapter
    path: Path | None
    model_hash: str  # sshs_model_hash (A1111 shows its first 12 hex digits)


def _rank_coefficients(coeffs, scales: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """c for B_cat·diag(c)·A_cat: each adapter's weight × its alpha/r (in float64), repeated over its ranks, as fp32."""
    per_name = torch.tensor([w for _, w in coeffs], dtype=torch.float64) * scales
    return per_name.repeat_interleave(rows).to(torch.float32)


@dataclass
class _Target:
    """One layer that some adapter modifies: its pristine weight and each adapter's factors."""

    layer: torch.nn.Module
    # adapter name -> (down [r, in·k·k], up [out, r], alpha / r)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    pristine: torch.Tensor | None = None
    applied: tuple = ()  # ((name, weight), ...) fused into the weight right now
    _cat: tuple | None = None  # (names, down_cat, up_cat on the weight's device; scales, rows per name on CPU)
    # adapter name -> a module that is not a plain LoRA pair (LoHa, LoKr, Tucker, full diff, DoRA)
    extra: dict[str, LycoModule] = field(default_factory=dict)
    _deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> its ΔW at weight 1 before DoRA (fp32)
    pristine_bias: torch.Tensor | None = None  # taken when a module first changes the bias (diff_b)

    def _concat(self, names: tuple[str, ...], device: torch.device):
        if self._cat is None or self._cat[0] != names or self._cat[1].device != device:
            downs = [self.factors[n][0].to(device, torch.float32) for n in names]
            ups = [self.factors[n][1].to(device, torch.float32) for n in names]
            rows = torch.tensor([d.shape[0] for d in downs])
            scales = torch.tensor([self.factors[n][2] for n in names], dtype=torch.float64)
            self._cat = (names, torch.cat(downs), torch.cat(ups, dim=1), scales, rows)
        return self._cat

    def apply(self, coeffs: tuple[tuple[str, float], ...], backup_device: str | None) -> bool:
        """Set W = W₀ + Σ wᵢ sᵢ BᵢAᵢ for the nonzero ``coeffs``; returns whether the weight was rewritten."""
        if coeffs == self.applied:
            return False
        from .quantize import delta_setter

        set_delta = delta_setter(self.layer)
        if set_delta is not None:  # a quantized layer (quantize.py): W₀ stays as stored, ΔW goes in as factors
            names = tuple(n for n, _ in coeffs)  # plain LoRA pairs only: Blender.load refuses other modules here
            if coeffs:
                _, down, up, scales, rows = self._concat(names, torch.device("cpu"))
                set_delta((up * _rank_coefficients(coeffs, scales, rows), down))
            else:
                set_delta(None)
            self.applied = coeffs
            return True
        weight = self.layer.weight
        if self.pristine is None:
            self.pristine = weight.detach().to(backup_device or weight.device, copy=True)
        with torch.no_grad():
            if not coeffs:
                weight.copy_(self.pristine)  # exact restore: no arithmetic on the way back
            elif any(n in self.extra for n, _ in coeffs):
                weight.copy_(self._lyco_weight(coeffs, weight.device, backup_device).view(weight.shape)
                             .to(weight.dtype))
            else:
                _, down, up, scales, rows = self._concat(tuple(n for n, _ in coeffs), weight.device)
                c = _rank_coefficients(coeffs, scales, rows).to(weight.device)  # one small copy per layer
                # One matmul of concatenated factors: B_cat · diag(c) · A_cat, accumulated in fp32.
                delta = (up * c) @ down
                base = self.pristine.to(weight.device, torch.float32)
                weight.copy_((base + delta.view(weight.shape)).to(weight.dtype))
            if self.extra:
                self._apply_bias(coeffs, backup_device)
        self.applied = coeffs
        return True

    def _delta(self, name: str, device: torch.device, backup_device: str | None) -> torch.Tensor:
        """A non-LoRA module's ΔW at weight 1 (before DoRA), computed once and kept beside the pristine weight."""
        if name not in self._deltas:  # built on the weight's device (a GPU does LoKr/Tucker products faster)
            m = self.extra[name]
            on_device = LycoModule(m.kind, {r: t.to(device) for r, t in m.tensors.items()}, m.alpha, m.shape,
                                   m.dora_axis)
            self._deltas[name] = on_device.base_delta().to(backup_device or device)
        return self._deltas[name].to(device, torch.float32)

    def _lyco_weight(self, coeffs, device, backup_device) -> torch.Tensor:
        """W for a blend with LyCORIS / full-diff / DoRA modules, always from the pristine weight (fp32).

        Without DoRA it is a sum: W₀ + the concatenated-LoRA product + Σ wᵢ·ΔWᵢ. With DoRA it is not: DoRA rescales
        the weight it is applied to. Then the adapters are applied one after the other in load order, each on the
        weight the ones before it left, as A1111 (networks.py: every network's calc_updown gets the running
        self.weight) and ComfyUI (calculate_weight: patches in order on the running weight) do; a DoRA module at
        weight w gives W + w·(DoRA(W + ΔW) − W) (A1111 network.py finalize_updown, ComfyUI weight_decompose).
        """
        w_run = self.pristine.to(device, torch.float32, copy=True)
        shape = w_run.shape
        dora = any(n in self.extra and self.extra[n].dora for n, _ in coeffs)
        loras = tuple((n, w) for n, w in coeffs if n not in self.extra)
        if loras and not dora:
            _, down, up, scales, rows = self._concat(tuple(n for n, _ in loras), device)
            per_name = torch.tensor([w for _, w in loras], dtype=torch.float64) * scales
            c = per_name.repeat_interleave(rows).to(device, torch.float32)
            w_run += ((up * c) @ down).view(shape)
        for n, w in coeffs:
            if n in self.extra:
                d = self._delta(n, device, backup_device)
                if self.extra[n].dora:
                    w_run += w * self.extra[n].dora_delta(w_run, d)
                else:
                    w_run += w * d
            elif dora:
                down, up, scale = self.factors[n]
                w_run += (float(w) * scale * (up.to(device, torch.float32) @ down.to(device, torch.float32))
                          ).view(shape)
        return w_run

    def _apply_bias(self, coeffs, backup_device) -> None:
        """b = b₀ + Σ wᵢ·diff_bᵢ (A1111 network_full.py: the bias difference times the multiplier, no alpha)."""
        parts = [(self.extra[n].bias_delta(), w) for n, w in coeffs
                 if n in self.extra and self.extra[n].bias_delta() is not None]
        bias = getattr(self.layer, "bias", None)
        if bias is None or (self.pristine_bias is None and not parts):
            return
        if self.pristine_bias is None:
            self.pristine_bias = bias.detach().to(backup_device or bias.device, copy=True)
        if not parts:
            bias.copy_(self.pristine_bias)
            return
        b = self.pristine_bias.to(bias.device, torch.float32)
        for d, w in parts:
            b = b + float(w) * d.to(bias.device, torch.float32)
        bias.copy_(b.to(bias.dtype))


TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # text encoder -> its tokenizer


def encoders(pipe) -> dict[str, tuple]:
    """{component: (tokenizer, text encoder)} for each text encoder the pipeline has."""
    return {comp: (getattr(pipe, tok, None), getattr(pipe, comp)) for comp, tok in TOKENIZERS.items()
            if getattr(pipe, comp, None) is not None}


def _where(adapter: Adapter, path: Path | None) -> str:
    return f"adapter {adapter.name!r}" + (f" ({path})" if path else "")


def check_embeddings(adapter: Adapter, path: Path | None, pipe, loaded: dict[str, Loaded]) -> None:
    """Refuse trigger-token embeddings that cannot go into ``pipe`` (before anything is changed): a missing or extra
    text encoder, a wrong width, NaN, a word another loaded adapter uses, a word the tokenizer already knows."""
    if not adapter.embeddings:
        return
    from diffusers.loaders import TextualInversionLoaderMixin

    where = _where(adapter, path)
    if not isinstance(pipe, TextualInversionLoaderMixin):
        raise AdapterError(f"{where} carries learnt trigger tokens ({', '.join(adapter.embeddings)}) but a "
                           f"{type(pipe).__name__} does not expand them in prompts (not a diffusers "
                           "TextualInversionLoaderMixin); use a Stable Diffusion or SDXL text-to-image pipeline")
    parts = encoders(pipe)
    taken = {t: n for n, held in loaded.items() for e in held.adapter.embeddings.values() for t in e.tokens()}
    vocabs = {comp: tok.get_vocab() for comp, (tok, _) in parts.items()}
    for word, emb in adapter.embeddings.items():
        what = f"{where}: trigger embedding {word!r}"
        if emb.name != word or not word or any(ch.isspace() for ch in word):
            raise AdapterError(f"{what}: the word must be one token without spaces and match its name {emb.name!r}")
        if set(emb.vectors) != set(parts):
            raise AdapterError(f"{what} has vectors for {sorted(emb.vectors)} but the base model's text encoders are "
                               f"{sorted(parts)}; it was made for another model family")
        for comp, vec in emb.vectors.items():
            width = parts[comp][1].get_input_embeddings().embedding_dim
            if vec.dim() != 2 or vec.shape[0] != emb.num_tokens or vec.shape[0] < 1 or vec.shape[1] != width:
                raise AdapterError(f"{what}: {comp} vectors have shape {tuple(vec.shape)}; the base model's {comp} "
                                   f"needs [{emb.num_tokens or 'N >= 1'}, {width}]")
            if not torch.isfinite(vec).all():
                raise AdapterError(f"{what}: {comp} vectors contain NaN or inf")
        clash = next((t for t in emb.tokens() if t in taken), None)
        if clash is not None:
            other = loaded[taken[clash]]
            alias = f" (loaded as {taken[clash]!r})" if taken[clash] != other.adapter.name else ""
            raise AdapterError(f"{where} and {_where(other.adapter, other.path)}{alias} both define the trigger "
                               f"token {clash!r}; load only one of them, or rename one's trigger word "
                               "(stylelora merge --rename)")
        for comp, vocab in vocabs.items():
            known = next((t for t in emb.tokens() if t in vocab), None)
            if known is not None:
                raise AdapterError(f"{what}: the base model's {TOKENIZERS[comp]} already has a token {known!r}; "
                                   "rename the trigger word (stylelora merge --rename) so it cannot mean two things")


def insert_tokens(pipe, embeddings: list[TokenEmbedding]) -> None:
    """Add each embedding's tokens to every tokenizer and its vectors as new rows of the text encoder's input
    table, with diffusers' own ``load_textual_inversion`` (so prompts are expanded as diffusers does it)."""
    done = []
    try:
        for emb in embeddings:
            for comp, (tok, te) in encoders(pipe).items():
                device = te.get_input_embeddings().weight.device
                # transformers grows the table by sampling the new rows (then overwritten) from the global RNG:
                # keep the caller's random stream as it was.
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    pipe.load_textual_inversion(emb.vectors[comp].detach(), token=emb.name, tokenizer=tok,
                                                text_encoder=te)
                done.append((emb, comp))
    except Exception as e:
        for emb, comp in reversed(done):
            remove_tokens(pipe, emb, comp)
        raise AdapterError(f"cannot add the trigger tokens {[emb.name for emb in embeddings]}: {e}") from e


def remove_tokens(pipe, emb: TokenEmbedding, comp: str) -> None:
    """Take one embedding's tokens out of ``comp``'s tokenizer and text encoder (diffusers'
    ``unload_textual_inversion``), leaving the same embedding module with the remaining rows."""
    tok, te = encoders(pipe)[comp]
    table = te.get_input_embeddings()
    with torch.random.fork_rng(devices=[]):  # diffusers builds a fresh nn.Embedding, whose init draws on the CPU RNG
        pipe.unload_textual_inversion(tokens=emb.tokens(), tokenizer=tok, text_encoder=te)
    # Put the rows back into the module we started with, so hooks, requires_grad and references to it stay valid,
    # and make the config say the real row count again (diffusers leaves it at the grown size).
    fresh = te.get_input_embeddings()
    table.weight.data = fresh.weight.data
    table.num_embeddings = fresh.num_embeddings
    te.set_input_embeddings(table)
    te.config.vocab_size = table.num_embeddings


class Blender:
    """A weighted set of LoRA adapters fused into ``pipe``'s weights; ``set`` re-blends, all-zero restores W₀ exactly.

    ``blender.load("ink.safetensors"); blender.set({"ink": 0.8, "pastel": (0.4, 0.2)})`` — a pair is
    (UNet weight, text-encoder weight); adapters not named in ``set`` get weight 0 but stay loaded.
    Per-block weights (A1111's LoRA Block Weight, stylelora/blocks.py): ``{"ink": (0.8, "INS")}`` or
    ``{"ink": BlockWeight((0.8, 0.5), "1,0,0,…")}``; each layer's coefficient is its weight times its block's value.
    """

    def __init__(self, pipe, *, family=None, backup_device: str | None = None):
        if hasattr(pipe, "pipe") and hasattr(pipe, "family"):  # a models.Base
            family = family if family is not None else pipe.family
            pipe = pipe.pipe
        if family is None:
            from .models import detect_family

            family = detect_family(pipe)
        self.pipe = pipe
        self.family = family_key(family)
        self.backup_device = backup_device  # e.g. "cpu" to keep W₀ copies off a small GPU
        self.loaded: dict[str, Loaded] = {}
        self._weights: dict[str, tuple[float, float]] = {}
        self._targets: dict[tuple[str, str], _Target] = {}
        self._index: dict[str, set[tuple[str, str]]] = {}  # adapter name -> target keys it touches
        self._tokens: dict[str, list[TokenEmbedding]] = {}  # adapter name -> its embeddings now in the tokenizers
        self._blocks: dict[str, Blocks] = {}  # adapter name -> its block-weight vector, if it has one
        self._block_of: dict[tuple[str, str], str | None] = {}  # target key -> its A1111 block (blocks.block_of)
        self._warned: set = set()

    # ------------------------------------------------------------------------------------------ adapters
    @property
    def names(self) -> list[str]:
        return list(self.loaded)

    @property
    def weights(self) -> dict[str, tuple[float, float]]:
        """Current (unet, text_encoder) weight of every loaded adapter."""
        return dict(self._weights)

    @property
    def blocks(self) -> dict[str, Blocks]:
        """The block-weight vector of each adapter that has one (the others: every block 1)."""
        return dict(self._blocks)

    def active(self) -> dict[str, tuple[float, float]]:
        """Adapters with a nonzero weight, in load order."""
        return {n: w for n, w in self._weights.items() if w != (0.0, 0.0)}

    def load(self, source: str | Path | Adapter, *, name: str | None = None, weight: Weight | None = None) -> str:
        """Add an adapter (file or in-memory ``Adapter``) at weight 0 unless ``weight`` is given; returns its name."""
        path = None
        if isinstance(source, Adapter):
            adapter, model_hash = source, source.metadata.get("sshs_model_hash") or source.content_hash()
        else:
            path = Path(source).expanduser()
            adapter = read_adapter(path, pipe=self.pipe)
            model_hash = adapter.metadata.get("sshs_model_hash") or file_digests(path)[1]
        name = name or adapter.name
        if name in self.loaded:
            if self.loaded[name].adapter is adapter or self.loaded[name].model_hash == model_hash:
                if weight is not None:
                    self.update({name: weight})
                return name
            raise AdapterError(f"an adapter named {name!r} is already loaded from another file "
                               f"({self.loaded[name].path}); pass name=... or unload it first")
        self._check_family(adapter, path)
        from .quantize import check_adapter, delta_setter

        check_adapter(adapter, self.pipe, path)  # a warning: trained on a base quantized another way
        targets = self._resolve(adapter, path)
        lyco_on_quantized = [f"{c}.{p}" for (c, p), (layer, f) in targets.items()
                             if isinstance(f, LycoModule) and delta_setter(layer) is not None]
        if lyco_on_quantized:  # a quantized layer takes a blend as LoRA factors only (quantize.delta_setter)
            raise AdapterError(f"{_where(adapter, path)}: {lyco_on_quantized[0]} is a LyCORIS/DoRA/full-difference "
                               "module, which cannot be blended into a quantized base layer; load the base without "
                               "--quantize-base to use it")
        check_embeddings(adapter, path, self.pipe, self.loaded)
        for key, (layer, factors) in targets.items():
            target = self._targets.setdefault(key, _Target(layer))
            if isinstance(factors, LycoModule):
                target.extra[name] = factors
            else:
                target.factors[name] = factors
            target._cat = None
        self._index[name] = set(targets)
        self.loaded[name] = Loaded(adapter, path, model_hash)
        self._weights[name] = (0.0, 0.0)
        if weight is not None:
            self.update({name: weight})
        return name

    def load_refs(self, refs, folders=()) -> dict[str, tuple[float, float]]:
        """Load each ``prompt.LoraRef`` (path, or name looked up in ``folders``); returns {name: (unet, te)}."""
        from .prompt import resolve

        weights: dict[str, tuple[float, float]] = {}
        for ref in refs:
            name = self.load(resolve(ref, list(folders)))
            if name in weights:
                raise AdapterError(f"adapter {name!r} is given twice; give it once with the weight you want")
            pair = as_pair(ref.weights, f"weight of {name!r}")
            weights[name] = BlockWeight(pair, ref.blocks) if getattr(ref, "blocks", None) is not None else pair
        return weights

    def unload(self, name: str) -> None:
        """Remove an adapter; the layers it touched are re-blended without it."""
        self._require([name])
        self.update({name: 0.0})
        for key in self._index.pop(name):
            target = self._targets[key]
            target.factors.pop(name, None)
            target.extra.pop(name, None)
            target._deltas.pop(name, None)
            target._cat = None
        del self.loaded[name], self._weights[name]
        self._blocks.pop(name, None)

    def _check_family(self, adapter: Adapter, path: Path | None) -> None:
        if not compatible(adapter.family, self.family):
            where = f" ({path})" if path else ""
            raise AdapterError(f"adapter {adapter.name!r}{where} was made for {adapter.family} but the base model is "
                               f"{self.family}; use an adapter trained for a {self.family} model")

    def _resolve(self, adapter: Adapter, path: Path | None) -> dict:
        """Find each adapter module's layer in the pipe and check shapes; errors name the module."""
        from .lora import components  # peft is heavy; `import stylelora` should not pay for it
        from .quantize import weight_shape

        where = f"adapter {adapter.name!r}" + (f" ({path})" if path else "")
        parts = components(self.pipe)
        out = {}
        for comp, mods in adapter.modules.items():
            if not mods:
                continue
            if comp not in parts:
                raise AdapterError(f"{where} has {comp} weights but the base model has no {comp}")
            for mpath, m in mods.items():
                try:
                    layer = parts[comp].get_submodule(mpath)
                except AttributeError:
                    raise AdapterError(f"{where}: the base model has no module {comp}.{mpath}") from None
                layer = getattr(layer, "base_layer", layer)  # a PEFT-wrapped layer: blend into its base weight
                if isinstance(m, LycoModule):
                    out[(comp, mpath)] = (layer, self._check_lyco(where, comp, mpath, m, layer))
                    continue
                down, up = m.down.detach(), m.up.detach()
                shape = weight_shape(layer)  # quantized layers: the logical shape, not the storage's
                if shape is None or up.shape[0] != shape[0] or down[0].numel() != math.prod(shape[1:]) \
                        or down.shape[0] != up.shape[1]:
                    raise AdapterError(f"{where}: {comp}.{mpath} has down {tuple(down.shape)} / up {tuple(up.shape)}, "
                                       f"which does not fit the layer weight {shape}")
                if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                    raise AdapterError(f"{where}: {comp}.{mpath} contains NaN or inf")
                out[(comp, mpath)] = (layer, (down.flatten(1), up.flatten(1), m.scale))
        return out

    @staticmethod
    def _check_lyco(where: str, comp: str, mpath: str, m: LycoModule, layer) -> LycoModule:
        weight = getattr(layer, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(m.shape):
            raise AdapterError(f"{where}: {comp}.{mpath} is a {m.kind} module for a weight of shape {tuple(m.shape)}, "
                               f"which does not fit the layer weight "
                               f"{tuple(weight.shape) if weight is not None else None}")
        if m.bias_delta() is not None and getattr(layer, "bias", None) is None:
            raise AdapterError(f"{where}: {comp}.{mpath} has a bias difference (diff_b) but the layer has no bias")
        return m

    # ------------------------------------------------------------------------------------------ weights
    def set(self, weights: dict[str, Weight]) -> int:
        """Make ``weights`` the blend (unnamed adapters -> 0); returns how many layers were rewritten. A value may
        carry block weights (``(w, "INS")``, ``BlockWeight``); a plain one means every block at 1."""
        self._require(weights)
        new = {n: (0.0, 0.0) for n in self.loaded}
        new_blocks = {}
        for n, w in weights.items():
            plain, vector = split_weight(w, f"weight of {n!r}")
            new[n] = as_pair(plain, f"weight of {n!r}")
            if vector is not None:
                new_blocks[n] = vector
                self._check_blocks(n, vector)
        changed = [n for n in new if new[n] != self._weights.get(n) or new_blocks.get(n) != self._blocks.get(n)]
        self._weights, self._blocks = new, new_blocks
        keys = set().union(*(self._index[n] for n in changed)) if changed else set()
        rewritten = sum(self._refresh(k) for k in keys)
        self._sync_tokens()
        return rewritten

    def update(self, weights: dict[str, Weight]) -> int:
        """Change only the named adapters' weights."""
        self._require(weights)
        current = {n: BlockWeight(w, self._blocks[n]) if n in self._blocks else w for n, w in self._weights.items()}
        return self.set({**current, **weights})

    def reset(self) -> int:
        """All weights 0: every touched layer gets its pristine weight back, bit for bit, and every trigger token
        leaves the tokenizer(s) and text encoder(s)."""
        return self.set({})

    def trigger_words(self) -> dict[str, str]:
        """{word: adapter name} for the learnt trigger words in the tokenizer(s) now (adapters in the blend)."""
        return {e.name: n for n, embs in self._tokens.items() for e in embs}

    def _sync_tokens(self) -> None:
        """Trigger tokens follow the blend: in while an adapter's weight is nonzero, out (exactly) at 0."""
        active = [n for n, w in self._weights.items() if w != (0.0, 0.0) and self.loaded[n].adapter.embeddings]
        for name in [n for n in self._tokens if n not in active]:
            for emb in reversed(self._tokens.pop(name)):
                for comp in encoders(self.pipe):
                    remove_tokens(self.pipe, emb, comp)
        for name in active:
            if name not in self._tokens:
                embs = list(self.loaded[name].adapter.embeddings.values())
                insert_tokens(self.pipe, embs)
                self._tokens[name] = embs

    def _require(self, names) -> None:
        unknown = [n for n in names if n not in self.loaded]
        if unknown:
            raise AdapterError(f"adapter(s) {unknown} not loaded; loaded: {sorted(self.loaded) or 'none'}")

    def _refresh(self, key: tuple[str, str]) -> bool:
        target = self._targets[key]
        idx = 1 if key[0].startswith("text_encoder") else 0
        names = target.factors if not target.extra else [n for n in self.loaded if n in target.factors or
                                                           n in target.extra]  # load order: DoRA depends on it
        coeffs = tuple((n, self._weights[n][idx] * self._multiplier(n, key)) for n in names)
        return target.apply(tuple((n, c) for n, c in coeffs if c != 0.0), self.backup_device)

    def _multiplier(self, name: str, key: tuple[str, str]) -> float:
        """The block multiplier of adapter ``name`` on target ``key`` (1.0 without block weights)."""
        vector = self._blocks.get(name)
        if vector is None:
            return 1.0
        if key not in self._block_of:
            self._block_of[key] = block_of(key[0], key[1], self.pipe.unet.config)
        return vector.multiplier(self._block_of[key])

    def _check_blocks(self, name: str, vector: Blocks) -> None:
        """Warn once per adapter and vector where the vector zeroes blocks the adapter has modules in."""
        if (name, vector) not in self._warned:
            self._warned.add((name, vector))
            check_fit(name, self.loaded[name].adapter.modules, vector, self.pipe.unet.config, self.family)

    def delta(self, component: str, path: str) -> torch.Tensor:
        """The fused ΔW of one layer right now (fp32): current weight minus pristine weight."""
        target = self._targets[(component, path)]
        base = target.pristine if target.pristine is not None else getattr(target.layer, "base_weight",
                                                                           target.layer.weight)
        return target.layer.weight.detach().float() - base.to(target.layer.weight.device).float()

    def __repr__(self) -> str:
        ws = ", ".join(f"{n}={w[0]:g}" + (f"/{w[1]:g}" if w[1] != w[0] else "")
                       + (f"@{self._blocks[n]}" if n in self._blocks else "") for n, w in self._weights.items())
        return f"Blender({self.family}, {len(self._targets)} layers, {ws or 'no adapters'})"

