"""The in-memory adapter: per component, per module, one low-rank pair and its alpha; plus learnt token embeddings.

Every file format is read into this and written from it; training produces it and blending consumes it.
Module paths are the live diffusers/transformers module names (``named_modules()``), e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` in component ``unet``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    """ΔW = (alpha / rank) · up @ down. Linear: down [r, in], up [out, r]; conv: down [r, in, kh, kw], up [out, r, 1, 1]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Full weight update, in the shape of the target layer's weight."""
        down = self.down.to(dtype)
        up = self.up.to(dtype)
        if down.dim() == 2:
            return self.scale * (up @ down)
        # conv: up is [out, r, 1, 1]; down is [r, in, kh, kw]
        d = torch.einsum("or,rikl->oikl", up.flatten(1), down)
        return self.scale * d


def common_alpha(ranks) -> float:
    """The one alpha a file we write gives every module: the most common rank (ties: the larger), so alpha = rank
    (scale 1) wherever the ranks agree; each module's own scale is folded into its factors instead. Why one value:
    diffusers' kohya reader applies one alpha per part to SD1 UNet modules, so a file whose alphas differ loads
    there with the wrong scale on some modules (A1111 and ComfyUI read either). Used by merge, resize and the
    AdaLoRA export, whose modules end with different ranks."""
    counts = Counter(int(r) for r in ranks)
    return float(max(counts, key=lambda r: (counts[r], r)))


@dataclass
class TokenEmbedding:
    """Learnt input vectors that stand for one word in prompts (textual inversion; "pivotal tuning" with a LoRA).

    ``vectors[component]`` is ``[num_tokens, width]`` for each text encoder the family has ("text_encoder", and
    "text_encoder_2" on SDXL; every component has the same ``num_tokens``). In a tokenizer the word becomes
    ``num_tokens`` added tokens named as diffusers' ``load_textual_inversion`` names them: ``name``, ``name_1``,
    ... ``name_{n-1}``; a prompt that says ``name`` is expanded to all of them (diffusers' ``maybe_convert_prompt``).
    """

    name: str
    vectors: dict[str, torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0]) if self.vectors else 0

    def tokens(self) -> list[str]:
        """The added-token strings, in order: ``name``, ``name_1``, ..."""
        return [self.name] + [f"{self.name}_{i}" for i in range(1, self.num_tokens)]


@dataclass
class Adapter:
    """A LoRA adapter: ``modules[component][module_path] -> LoraModule``, learnt token ``embeddings`` by the word
    they stand for, plus string metadata."""

    modules: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None  # e.g. "sd1", "sd2", "sd2-v", "sdxl"; None when unknown
    name: str = "adapter"
    embeddings: dict[str, TokenEmbedding] = field(default_factory=dict)

    def components(self) -> list[str]:
        return [c for c in COMPONENTS if self.modules.get(c)]

    def num_modules(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def ranks(self) -> dict[str, set[int]]:
        return {c: {m.rank for m in mods.values()} for c, mods in self.modules.items() if mods}

    def content_hash(self) -> str:
        """sha256 over module names, shapes and tensor bytes, and the token embeddings (independent of file layout and
        metadata; an adapter without embeddings hashes as it always did)."""
        h = hashlib.sha256()

        def add(t: torch.Tensor) -> None:
            t = t.detach().contiguous().cpu()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

        for comp in sorted(self.modules):
            for path in sorted(self.modules[comp]):
                m = self.modules[comp][path]
                h.update(f"{comp}/{path}/{m.alpha!r}".encode())
                add(m.down)
                add(m.up)
        for word in sorted(self.embeddings):
            for comp in sorted(self.embeddings[word].vectors):
                h.update(f"embedding/{word}/{comp}".encode())
                add(self.embeddings[word].vectors[comp])
        return h.hexdigest()
