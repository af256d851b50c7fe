"""Trigger tokens learnt with the LoRA ("pivotal tuning", ``--train-tokens N``).

The trigger word becomes ``N`` new tokens in every tokenizer of the base (named as diffusers'
``load_textual_inversion`` names them: ``word``, ``word_1``, ... ``word_{N-1}``; a caption that says ``word`` is
expanded to all of them by diffusers' own ``maybe_convert_prompt``, as its pipelines do at inference), and ``N`` new
input-embedding rows in every text encoder, trained beside the LoRA with their own learning rate.

How the rows train: each text encoder's input embedding is replaced by ``AddedRows``, which reads ids below the new
tokens from the original ``nn.Embedding`` (frozen, never written) and the new ids from one ``[N, width]`` fp32
parameter. Only that parameter is in the optimizer, so every old row stays bit-identical by construction (nothing
has to be copied back after each step, and the optimizer state and checkpoints hold just the new rows). Giving the
base back (``remove``) puts the original tokenizer objects and embedding modules back in place: exact, since they
were never modified (the tokens were added to copies of the tokenizers).
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import TokenEmbedding
from .errors import ConfigError

# characters a prompt word cannot hold (separators, A1111 prompt syntax, the dot A1111 splits bundle_emb keys at);
# the same rule the adapter files apply to embedding names (formats/validate.py check_word)
_BAD_WORD = re.compile(r"[\s.,:;()\[\]{}<>|\\\"']")


def check_trigger(trigger: str | None, n: int) -> None:
    """A trigger word that can become ``n`` learnt tokens (clear error otherwise)."""
    if not trigger:
        raise ConfigError(f"--train-tokens {n} needs a trigger word: the learnt tokens stand for it in captions and "
                          "prompts. Add --trigger WORD (TOML [data] trigger), a rare word such as 'zkstyle'.")
    if _BAD_WORD.search(trigger):
        raise ConfigError(f"trigger {trigger!r} cannot become learnt tokens: it must be one word without spaces, dots, "
                          "commas, colons, quotes or brackets (an embedding is named and triggered by it)")


class AddedRows(nn.Module):
    """A text encoder's input embedding plus ``N`` trainable rows for ids ``first .. first+N-1`` and ``M`` untrained
    stand-in rows after them (``--blend-ready``: redrawn every step, never saved)."""

    def __init__(self, base: nn.Embedding, first: int, init: torch.Tensor, standins: int = 0):
        super().__init__()
        self.base = base
        self.first = first
        # fp32 whatever the text encoder's dtype (as the LoRA weights): small updates survive in bf16/fp16 runs
        self.rows = nn.Parameter(init.detach().to(base.weight.device, torch.float32).clone())
        self.register_buffer("standin", torch.zeros((standins, init.shape[1]), device=base.weight.device),
                             persistent=False)
        self.num_embeddings = first + init.shape[0] + standins
        self.embedding_dim = base.embedding_dim

    def _table(self) -> torch.Tensor:
        return torch.cat([self.rows, self.standin]) if len(self.standin) else self.rows

    @property
    def weight(self) -> torch.Tensor:
        """The whole matrix an ``nn.Embedding`` would hold (for code that reads ``get_input_embeddings().weight``)."""
        return torch.cat([self.base.weight[: self.first], self._table().to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        old = self.base(ids.clamp(max=self.first - 1))
        # every id reads `rows` (the old ids at row 0, masked out below), so `rows` is used in every forward and
        # DDP always sees its gradient, also for a batch without the trigger
        new = F.embedding((ids - self.first).clamp(min=0), self._table()).to(old.dtype)
        return torch.where((ids >= self.first).unsqueeze(-1), new, old)


class TriggerTokens:
    """The learnt tokens of one run: added to a pipeline's tokenizers, then rows to its text encoders; ``remove``
    gives the pipeline back as it was. Empty (``active`` False) until ``add_tokens``."""

    def __init__(self):
        self.word: str | None = None
        self.n = 0
        self.ids: dict[str, list[int]] = {}          # text encoder name -> the new token ids in its tokenizer
        self.tokenizers: dict[str, object] = {}      # tokenizer attribute -> the original tokenizer object
        self.embeddings: dict[str, nn.Module] = {}   # text encoder name -> its original input embedding
        self.rows: dict[str, nn.Parameter] = {}      # text encoder name -> the trainable [N, width] rows
        self.standins = 0                            # --blend-ready: untrained stand-in tokens after the learnt ones
        self.modules: dict[str, AddedRows] = {}      # text encoder name -> its AddedRows while the rows are in
        self.standin_norm: dict[str, float] = {}     # text encoder name -> the vocabulary's mean embedding norm

    @property
    def active(self) -> bool:
        return self.n > 0

    def names(self) -> list[str]:
        return [self.word] + [f"{self.word}_{i}" for i in range(1, self.n)]

    @property
    def standin_word(self) -> str | None:
        """The word that stands for another adapter's trigger in ``--blend-ready`` captions (expanded to all the
        stand-in tokens, as a learnt trigger is), or None without stand-ins."""
        if not self.standins:
            return None
        # neither may hold the other: diffusers expands multi-vector tokens with str.replace on the prompt
        word = "standinzq"
        while word in self.word or self.word in word:
            word += "q"
        return word

    def _standin_names(self) -> list[str]:
        w = self.standin_word
        return [w] + [f"{w}_{i}" for i in range(1, self.standins)] if w else []

    def add_tokens(self, pipe, text_encoders, word: str, n: int, standins: int = 0) -> None:
        """Add the ``n`` tokens (and ``standins`` stand-in tokens after them) to a copy of each text encoder's
        tokenizer and put the copies in ``pipe``."""
        check_trigger(word, n)
        if not hasattr(pipe, "maybe_convert_prompt"):
            raise ConfigError(f"{type(pipe).__name__} cannot expand multi-token trigger words (it is not one of "
                              "diffusers' textual-inversion pipelines); train without --train-tokens")
        self.word, self.n, self.standins = word, n, standins
        for te in text_encoders:
            attr = te.replace("text_encoder", "tokenizer")
            original = getattr(pipe, attr)
            tok = copy.deepcopy(original)
            if tok.add_tokens(self.names() + self._standin_names()) != n + standins:
                raise ConfigError(f"trigger {word!r}: the tokenizer ({attr}) already has a token "
                                  f"{word!r}, {word}_<i> or the stand-in word; choose another trigger word for --train-tokens")
            self.tokenizers[attr] = original
            setattr(pipe, attr, tok)
            ids = tok.convert_tokens_to_ids(self.names())
            if ids != list(range(ids[0], ids[0] + n)):
                raise ConfigError(f"{attr}: the new tokens got ids {ids}, not consecutive ones")
            # the trigger in a caption must turn into exactly the new tokens (a tokenizer that changes the word
            # first, e.g. by case or accents, would never use them)
            expanded = pipe.maybe_convert_prompt(word, tok)
            got = tok(expanded, add_special_tokens=False).input_ids
            if got != ids:
                raise ConfigError(f"trigger {word!r} does not tokenize to its new tokens in {attr} (got ids {got}, "
                                  f"expected {ids}); use a lower-case ASCII word")
            self.ids[te] = ids
            if standins:
                got = tok(pipe.maybe_convert_prompt(self.standin_word, tok), add_special_tokens=False).input_ids
                if got != list(range(ids[-1] + 1, ids[-1] + 1 + standins)):
                    raise ConfigError(f"{attr}: the --blend-ready stand-in word {self.standin_word!r} does not "
                                      f"tokenize to its {standins} new tokens (got ids {got}); use another trigger word")

    def in_caption(self, ids_per_tokenizer: list[torch.Tensor]) -> bool:
        """True if any of a caption's token ids (one tensor per text encoder, as TextConditioning.tokenize gives)
        is a learnt token."""
        return any(bool(torch.isin(ids, torch.tensor(new)).any())
                   for ids, new in zip(ids_per_tokenizer, self.ids.values()))

    def add_rows(self, pipe, init: str | None, seed: int) -> list[nn.Parameter]:
        """Give each text encoder its trainable rows; returns them (one per text encoder).

        ``init``: a word, whose tokens' mean embedding (in that encoder) every new row starts from; None: random
        directions scaled to the vocabulary's mean embedding norm, from a generator seeded by ``seed`` (not the
        global one, so the LoRA initialisation and every other random stream are those of a run without tokens).
        """
        gen = torch.Generator().manual_seed(seed)
        for te, ids in self.ids.items():
            encoder = getattr(pipe, te)
            base = encoder.get_input_embeddings()
            first = ids[0]
            if first > base.num_embeddings:
                raise ConfigError(f"{te} has {base.num_embeddings} token embeddings but its tokenizer already has "
                                  f"{first} tokens; this base cannot take learnt tokens")
            weight = base.weight.detach().float()
            if init:
                original = self.tokenizers[te.replace("text_encoder", "tokenizer")]
                init_ids = original(init, add_special_tokens=False).input_ids
                if not init_ids:
                    raise ConfigError(f"--token-init {init!r} has no tokens in {te}'s tokenizer; give a word")
                start = weight[init_ids].mean(0).expand(self.n, -1)
            else:
                norm = weight[:first].norm(dim=1).mean()
                start = torch.randn((self.n, weight.shape[1]), generator=gen).to(weight.device)
                start = start / start.norm(dim=1, keepdim=True) * norm
            self.embeddings[te] = base
            self.standin_norm[te] = float(weight[:first].norm(dim=1).mean())
            module = AddedRows(base, first, start, self.standins)
            encoder.set_input_embeddings(module)
            self.modules[te] = module
            self.rows[te] = module.rows
        return list(self.rows.values())

    def redraw_standins(self, gen: torch.Generator) -> None:
        """New stand-in vectors (``--blend-ready``): random directions of the vocabulary's mean embedding norm, the
        size a learnt trigger of another adapter starts at, drawn from ``gen`` (the step's generator)."""
        for te, module in self.modules.items():
            v = torch.randn(tuple(module.standin.shape), generator=gen).to(module.standin.device)
            module.standin.copy_(v / v.norm(dim=1, keepdim=True) * self.standin_norm[te])

    def with_standin(self, captions: list[str], share: float, gen: torch.Generator) -> list[str]:
        """``--blend-ready``: in a ``share`` of the captions that hold the trigger word, the stand-in word goes right
        before or right after it (one coin each), as another adapter's trigger sits in a blend's prompt."""
        pattern = re.compile(rf"(?<![\w]){re.escape(self.word)}(?![\w])")
        draws = torch.rand((len(captions), 2), generator=gen).tolist()
        out = []
        for caption, (use, side) in zip(captions, draws):
            found = pattern.search(caption) if use < share else None
            if found is None:
                out.append(caption)
            elif side < 0.5:
                out.append(f"{caption[:found.start()]}{self.standin_word} {caption[found.start():]}")
            else:
                out.append(f"{caption[:found.end()]} {self.standin_word}{caption[found.end():]}")
        return out

    def embedding(self) -> TokenEmbedding:
        """The learnt vectors, as the adapter carries them: ``{text encoder: [N, width]}`` fp32 on the CPU."""
        return TokenEmbedding(self.word, {te: r.detach().to("cpu", torch.float32).clone()
                                          for te, r in self.rows.items()})

    def remove(self, pipe) -> None:
        """Put the original embedding modules and tokenizers back (exact: they were never written)."""
        for te, base in self.embeddings.items():
            getattr(pipe, te).set_input_embeddings(base)
        for attr, tok in self.tokenizers.items():
            setattr(pipe, attr, tok)
        self.embeddings, self.tokenizers, self.rows, self.modules = {}, {}, {}, {}


STANDIN_TOKENS = 2  # --blend-ready: tokens of the stand-in for another trigger (the toy recipes learn 2 per trigger)


def stop_step(steps: int, fraction: float) -> int:
    """The tokens train in optimizer steps ``0 .. stop_step - 1`` (0-based) and stay fixed after (at least one)."""
    return max(1, math.ceil(steps * fraction))
