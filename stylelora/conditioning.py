"""Text conditioning and UNet inputs per family, computed exactly as the diffusers pipelines do at inference.

SD1/SD2: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden states concatenated,
plus the second encoder's pooled projection and the micro-conditioning ids
(original size, crop top-left, target size) — taken from each image's real size and bucket crop.
"""

from __future__ import annotations

import torch


class TextConditioning:
    """Tokenize and encode captions for a pipeline's text encoder(s)."""

    def __init__(self, pipe, family):
        self.family = family
        self.xl = family.spec.micro_conditioning  # SDXL: two encoders' states, pooled embeds, time ids
        # one tokenizer per text encoder of the family: text_encoder -> tokenizer, text_encoder_2 -> tokenizer_2
        self.tokenizers = [getattr(pipe, te.replace("text_encoder", "tokenizer")) for te in family.text_encoders]
        # learnt trigger tokens (stylelora/tokens.py): a word that stands for several added tokens is expanded to
        # all of them by the pipeline's own maybe_convert_prompt, exactly as its __call__ does at inference
        self.expand = pipe.maybe_convert_prompt if getattr(pipe, "maybe_convert_prompt", None) else None
        self.expand_tokens = False

    def tokenize(self, captions: list[str]) -> list[torch.Tensor]:
        """Token ids per encoder, padded to each tokenizer's max length."""
        return [
            tok(self.expand(captions, tok) if self.expand_tokens else captions, padding="max_length",
                max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            for tok in self.tokenizers
        ]

    def encode(self, encoders: list[torch.nn.Module], ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"hidden": [B, 77, D]}`` plus ``"pooled": [B, P]`` for SDXL; ``encoders`` may be DDP-wrapped."""
        if not self.xl:
            return {"hidden": encoders[0](ids[0].to(_device(encoders[0])))[0]}
        hidden, pooled = [], None
        for enc, tok_ids in zip(encoders, ids):
            out = enc(tok_ids.to(_device(enc)), output_hidden_states=True)
            if out[0].ndim == 2:  # the projection model's text_embeds: SDXL's pooled conditioning
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}


def unet_kwargs(family, cond: dict[str, torch.Tensor], *, original_sizes: torch.Tensor, crops: torch.Tensor,
                target_sizes: torch.Tensor, dtype: torch.dtype) -> dict:
    """Extra UNet arguments: SDXL's ``added_cond_kwargs`` (text_embeds, time_ids); nothing for SD1/SD2.

    ``original_sizes``/``crops``/``target_sizes``: [B, 2] as (height, width) / (top, left) / (height, width).
    """
    if not family.spec.micro_conditioning:
        return {}
    time_ids = torch.cat([original_sizes, crops, target_sizes], dim=1).to(cond["pooled"].device, dtype)
    return {"added_cond_kwargs": {"text_embeds": cond["pooled"].to(dtype), "time_ids": time_ids}}


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
