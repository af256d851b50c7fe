"""Training samples: images → buckets → (cached) VAE latents and text embeddings, served per batch.

With the cache on, the VAE runs once per (image, flip) and never inside the training step; with a frozen text
encoder, each distinct caption is encoded once. Random crops change every epoch, so they bypass the latent cache
and encode in the step (the slow path the example scripts always take; kept for that option and for benchmarks).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from . import data
from .cache import TensorCache, module_fingerprint
from .manifest import file_sha256
from .config import DataConfig
from .errors import DataError

log = logging.getLogger(__name__)


class TrainingSet:
    """Images of one run with their buckets; ``batch()`` returns model-ready tensors for a list of item indices."""

    def __init__(self, items: list[data.ImageItem], cfg: DataConfig, pipe, *, cache_root: Path,
                 cache_text: bool, device: torch.device, weight_dtype: torch.dtype, family=None,
                 learnt_tokens=None):
        from .conditioning import TextConditioning
        from .models import detect_family

        self.items, self.cfg, self.pipe = items, cfg, pipe
        self.family = family or detect_family(pipe)
        self.text = TextConditioning(pipe, self.family)
        self.encoders = [getattr(pipe, te) for te in self.family.text_encoders]
        self.device, self.weight_dtype = device, weight_dtype
        self.cache_latents = cfg.cache_latents and not cfg.random_crop
        if cfg.cache_latents and cfg.random_crop:
            log.warning("random_crop changes the crop every epoch, so latents are encoded each step (no latent cache)")
        self.cache_text = cache_text
        # learnt trigger tokens (stylelora/tokens.py TriggerTokens), already in the pipeline's tokenizers: captions
        # are expanded to them, and a caption that uses them is never cached (see prepare)
        self.learnt_tokens = learnt_tokens if learnt_tokens is not None and learnt_tokens.active else None
        self.text.expand_tokens = self.learnt_tokens is not None
        self.buckets = [
            data.assign_bucket(it.width, it.height, cfg.resolution, no_upscale=not cfg.upscale, step=cfg.bucket_step)
            for it in items
        ]
        self.latent_cache = TensorCache(cache_root, "latents")
        self.text_cache = TensorCache(cache_root, "text")
        self._latents: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}
        self._text: dict[str, torch.Tensor] = {}
        self._digests = [file_sha256(it.path) for it in items]

    # ------------------------------------------------------------------------------------------- preparation
    def fingerprint(self) -> str:
        """Identity of the data (files, captions, repeats, buckets): a resumed run must see the same."""
        h = hashlib.sha256()
        for it, dg, b in zip(self.items, self._digests, self.buckets):
            h.update(f"{it.path.name}|{dg}|{it.caption}|{it.repeats}|{b.width}x{b.height}\n".encode())
        return h.hexdigest()

    @torch.no_grad()
    def prepare(self) -> None:
        """Fill the caches: every (image, flip) latent and, with a frozen text encoder, every caption embedding."""
        vae = self.pipe.vae
        if self.cache_latents:
            vae_id = module_fingerprint(vae)
            flips = (False, True) if self.cfg.random_flip else (False,)
            for i, (it, b) in enumerate(zip(self.items, self.buckets)):
                for flip in flips:
                    key = TensorCache.key("latent", self._digests[i], b.width, b.height, "center", flip, vae_id,
                                          str(vae.dtype))
                    entry = self.latent_cache.get(key, check=lambda e, b=b: self._latent_problem(e, b))
                    if entry is None:
                        entry = self._encode_image(it, b, flip=flip, crop="center", gen=None)
                        self.latent_cache.put(key, entry)
                    # kept on the training device: a batch is then assembled without host-to-device copies
                    self._latents[(i, flip)] = {k: v.to(self.device) for k, v in entry.items()}
        if self.cache_text:
            te_id = "".join(module_fingerprint(e) for e in self.encoders)
            te_id += "".join(_tokenizer_id(t) for t in self.text.tokenizers)
            captions = {it.caption for it in self.items} | ({""} if self.cfg.caption_dropout else set())
            if self.learnt_tokens is not None:
                # The encoding of a caption that holds a learnt token changes at every step while the tokens
                # train, so it cannot be cached: cached_text encodes those live. The others (regularization
                # images, the empty caption of caption dropout, captions without the trigger) never read the
                # new rows and keep the cache.
                captions = {c for c in captions if not self.learnt_tokens.in_caption(self.text.tokenize([c]))}
            for caption in sorted(captions):
                key = TensorCache.key("text", caption, te_id, str(self.weight_dtype), self.family.arch)
                entry = self.text_cache.get(key)
                if entry is None:
                    cond = self.text.encode(self.encoders, self.text.tokenize([caption]))
                    entry = {k: v[0].float() for k, v in cond.items() if v is not None}
                    self.text_cache.put(key, entry)
                self._text[caption] = {k: v.to(self.device) for k, v in entry.items()}

    def _latent_problem(self, entry: dict[str, torch.Tensor], bucket) -> str | None:
        """What makes a cached latent entry unusable for ``bucket`` (None if nothing): its key and checksum can be
        right while its content is not what this VAE makes for this bucket (a crafted or foreign entry)."""
        cfg = self.pipe.vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        want = {"mean": (cfg.latent_channels, bucket.height // factor, bucket.width // factor), "orig": (2,),
                "crop": (2,)}
        want["std"] = want["mean"]
        if set(entry) != set(want):
            return f"tensors {sorted(entry)}, expected {sorted(want)}"
        for name, shape in want.items():
            t = entry[name]
            if tuple(t.shape) != shape or not t.is_floating_point():
                return f"{name} is {t.dtype} of shape {tuple(t.shape)}, expected float of shape {shape}"
            if not torch.isfinite(t).all():
                return f"{name} holds NaN or inf"
        return None

    def _encode_image(self, item, bucket, *, flip: bool, crop: str, gen) -> dict[str, torch.Tensor]:
        img = data.load_image(item.path)
        pixels, crop_tl, orig = data.prepare_pixels(img, bucket, crop=crop, flip=flip, rng=gen)
        vae = self.pipe.vae
        dist = vae.encode(pixels[None].to(self.device, vae.dtype)).latent_dist
        mean, std = dist.mean[0].float().cpu(), dist.std[0].float().cpu()
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            # an fp16 SD/SDXL VAE overflows on some images; training on NaN latents would poison the adapter
            raise DataError(f"the VAE produced NaN/inf latents for {item.path}. Run the VAE in fp32 (the default) or "
                            "use a fixed fp16 VAE, or remove this image.")
        return {"mean": mean, "std": std, "orig": torch.tensor(orig, dtype=torch.float32),
                "crop": torch.tensor(crop_tl, dtype=torch.float32)}

    # ------------------------------------------------------------------------------------------- batches
    def batch(self, indices: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Scaled latents and SDXL size/crop conditioning for a batch; flips and latent samples drawn from ``gen``."""
        vae = self.pipe.vae
        out, orig, crops = [], [], []
        for i in indices:
            flip = bool(self.cfg.random_flip and torch.rand((), generator=gen) < 0.5)
            if self.cache_latents:
                entry = self._latents[(i, flip)]
            else:
                with torch.no_grad():
                    entry = self._encode_image(self.items[i], self.buckets[i], flip=flip,
                                               crop="random" if self.cfg.random_crop else "center", gen=gen)
            mean, std = entry["mean"], entry["std"]
            out.append(mean + std * torch.randn(mean.shape, generator=gen).to(mean.device))
            orig.append(entry["orig"].cpu())
            crops.append(entry["crop"].cpu())
        lat = torch.stack(out)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        targets = torch.tensor([[self.buckets[i].height, self.buckets[i].width] for i in indices], dtype=torch.float32)
        return {"latents": ((lat - shift) * vae.config.scaling_factor).to(self.device),
                "original_sizes": torch.stack(orig), "crops": torch.stack(crops), "target_sizes": targets}

    def captions(self, indices: list[int], drop: list[bool] | None = None) -> list[str]:
        """The items' captions; where ``drop`` is True, the empty caption (caption dropout)."""
        return ["" if drop and drop[k] else self.items[i].caption for k, i in enumerate(indices)]

    def cached_text(self, indices: list[int], drop: list[bool] | None = None, encoders=None,
                    live_all: bool = False, captions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Text conditioning of a batch from the cache; captions the cache does not hold (those with learnt
        trigger tokens, see prepare), or all of them with ``live_all``, are encoded here with ``encoders``.
        ``captions``: the batch's captions as rewritten by the caller (default: the items' own)."""
        captions = captions if captions is not None else self.captions(indices, drop)
        live = [k for k, c in enumerate(captions) if live_all or c not in self._text]
        if not live:
            entries = [self._text[c] for c in captions]
            return {k: torch.stack([e[k] for e in entries]).to(self.device) for k in entries[0]}
        fresh = self.text.encode(encoders, self.text.tokenize([captions[k] for k in live]))
        fresh = {k: v.float() for k, v in fresh.items() if v is not None}  # the cache's dtype, to stack with it
        row = {k: j for j, k in enumerate(live)}
        entries = [{n: v[row[k]] for n, v in fresh.items()} if k in row else self._text[c]
                   for k, c in enumerate(captions)]
        return {k: torch.stack([e[k] for e in entries]).to(self.device) for k in entries[0]}


def _tokenizer_id(tok) -> str:
    vocab = tok.get_vocab()
    return hashlib.sha256(repr((type(tok).__name__, len(vocab), sorted(vocab.items())[:2000],
                                tok.model_max_length)).encode()).hexdigest()
