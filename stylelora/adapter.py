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


# Machine epsilon of fp32 added to DoRA's weight norm, as LyCORIS (modules/locon.py apply_weight_decompose) and
# ComfyUI (weight_adapter/base.py weight_decompose) do (A1111 adds none: 1e-7 relative, below any tolerance).
DORA_EPS = torch.finfo(torch.float32).eps


@dataclass
class LycoModule:
    """A module that is not a plain LoRA pair: LyCORIS LoHa / LoKr, LoCon with a Tucker ``lora_mid``, a full
    difference (``diff``, ``diff_b``), or any of these (or a LoRA pair) with a DoRA magnitude (``dora_scale``).

    ``tensors`` holds the file's tensors by role (``hada_w1_a``, ``lokr_w2``, ``down``/``up``/``mid``, ``diff``,
    ``diff_b``, ``dora_scale``); ``shape`` is the target layer's weight shape. ΔW follows each type's rule with
    A1111's / ComfyUI's alpha semantics (docs/formats.md, "LyCORIS files"); the rules are written from their
    documented math, not copied.
    """

    kind: str  # loha | lokr | tucker | full | norm (w_norm/b_norm) | lora (a LoRA pair with dora_scale)
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    shape: tuple[int, ...]
    dora_axis: str | None = None  # "out" (PEFT/LyCORIS) or "in" (kohya/OneTrainer/A1111) when dora_scale is there

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.tensors

    @property
    def rank(self) -> int | None:
        """The dimension alpha is divided by (A1111's ``dim``), or None where the type has none (scale 1)."""
        t = self.tensors
        if self.kind in ("lora", "tucker"):
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.kind == "lokr":  # w2's factor rank wins over w1's, as in A1111 network_lokr.py and ComfyUI lokr.py
            if "lokr_w2_b" in t:
                return int(t["lokr_w2_b"].shape[0])
            return int(t["lokr_w1_b"].shape[0]) if "lokr_w1_b" in t else None
        return None

    @property
    def scale(self) -> float:
        """alpha / dim where both exist, else 1 (A1111 network.py ``calc_scale``; a full diff is never scaled)."""
        r = self.rank
        return float(self.alpha) / r if self.alpha is not None and r else 1.0

    def base_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW before DoRA, scale included, in the layer's weight shape."""
        t = {k: v.to(dtype) for k, v in self.tensors.items() if k not in ("dora_scale", "diff_b", "b_norm")}
        if self.kind == "full":
            d = t["diff"]
        elif self.kind == "norm":  # a GroupNorm/LayerNorm weight difference (A1111 network_norm.py)
            d = t["w_norm"]
        elif self.kind == "lora":
            d = t["up"].flatten(1) @ t["down"].flatten(1)
        elif self.kind == "tucker":  # ΔW[o,i,k,l] = Σ up[o,n]·mid[n,m,k,l]·down[m,i]
            d = torch.einsum("nmkl,on,mi->oikl", t["mid"], t["up"].flatten(1), t["down"].flatten(1))
        elif self.kind == "loha":  # Hadamard product of two low-rank (or Tucker) products
            d = _low_rank(t, "hada_w1_a", "hada_w1_b", "hada_t1") * _low_rank(t, "hada_w2_a", "hada_w2_b", "hada_t2")
        elif self.kind == "lokr":  # Kronecker product; a 2-D w1 with a conv w2 acts on the channel axes only
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else _low_rank(t, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            d = torch.kron(w1.contiguous(), w2.contiguous())
        else:  # pragma: no cover - kinds are fixed by the loader
            raise ValueError(f"unknown module kind {self.kind!r}")
        return self.scale * (d.reshape(self.shape) if self.shape else d)

    def dora_delta(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """DoRA: W' = m · (W + ΔW) / ‖W + ΔW‖, the norm per output row (``dora_axis`` "out") or per input column
        ("in"); returns W' − W. ``weight`` is the weight the module is applied to (fp32)."""
        merged = weight + delta
        m = self.tensors["dora_scale"].to(merged.device, merged.dtype)
        ones = [1] * (merged.dim() - 1)
        if self.dora_axis == "out":
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *ones)
            m = m.reshape(merged.shape[0], *ones)
        else:
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, merged.shape[1], *ones[1:])
            m = m.reshape(1, merged.shape[1], *ones[1:])
        return merged * (m / (norm + DORA_EPS)) - weight

    def delta(self, dtype: torch.dtype = torch.float32, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Full weight update at weight 1. A DoRA module's depends on the weight it is applied to: pass it."""
        d = self.base_delta(dtype)
        if not self.dora:
            return d
        if weight is None:
            raise ValueError("a DoRA module's ΔW depends on the base weight: pass weight=")
        return self.dora_delta(weight.to(dtype), d)

    def bias_delta(self) -> torch.Tensor | None:
        """``diff_b`` / ``b_norm``: added to the layer's bias times the adapter weight (no alpha: A1111
        network_full.py, network_norm.py)."""
        return self.tensors.get("diff_b", self.tensors.get("b_norm"))


def _low_rank(t: dict, a: str, b: str, core: str) -> torch.Tensor:
    """a @ b, or with a Tucker core: W[p,q,k,l] = Σ core[i,j,k,l]·a[i,p]·b[j,q] (a: [r, out], b: [r, in])."""
    if core in t:
        return torch.einsum("ijkl,ip,jq->pqkl", t[core], t[a], t[b])
    return t[a].flatten(1) @ t[b].flatten(1)


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

    modules: dict[str, dict[str, LoraModule | LycoModule]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None  # e.g. "sd1", "sd2", "sd2-v", "sdxl"; None when unknown
    name: str = "adapter"
    embeddings: dict[str, TokenEmbedding] = field(default_factory=dict)

    def components(self) -> list[str]:
        return [c for c in COMPONENTS if self.modules.get(c)]

    def num_modules(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def ranks(self) -> dict[str, set[int]]:
        return {c: {m.rank for m in mods.values() if m.rank is not None} for c, mods in self.modules.items() if mods}

    def lyco(self) -> bool:
        """Whether any module is not a plain LoRA pair (LoHa, LoKr, Tucker, full diff, DoRA)."""
        return any(isinstance(m, LycoModule) for mods in self.modules.values() for m in mods.values())

    def needs_base(self) -> bool:
        """Whether some module's ΔW depends on the base weight (DoRA)."""
        return any(isinstance(m, LycoModule) and m.dora for mods in self.modules.values() for m in mods.values())

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
                if isinstance(m, LycoModule):
                    h.update(f"{comp}/{path}/{m.kind}/{m.dora_axis}/{m.alpha!r}".encode())
                    for role in sorted(m.tensors):
                        h.update(role.encode())
                        add(m.tensors[role])
                    continue
                h.update(f"{comp}/{path}/{m.alpha!r}".encode())
                add(m.down)
                add(m.up)
        for word in sorted(self.embeddings):
            for comp in sorted(self.embeddings[word].vectors):
                h.update(f"embedding/{word}/{comp}".encode())
                add(self.embeddings[word].vectors[comp])
        return h.hexdigest()
