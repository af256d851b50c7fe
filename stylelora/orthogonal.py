"""Orthogonal slots (``train --slot K``): adapters trained to be blended, whose updates cannot overlap.

Every targeted layer has one fixed orthonormal basis of its input space (dimension d = in·kh·kw), drawn from a
seed made of the layer's name only, so every adapter trained for the same base draws the same basis. An adapter
in slot K at rank r gets ``lora_down`` (A) = rows [K·r, (K+1)·r) of that basis, frozen; only ``lora_up`` (B)
trains. Two adapters in different slots then have A_a·A_bᵀ = 0: their updates ΔW = B·A read orthogonal parts of
every layer's input, so ΔW_a·ΔW_bᵀ = 0 and ⟨ΔW_a, ΔW_b⟩ = 0 (``stylelora blend-report`` measures both). The file is
a plain kohya LoRA (down = the frozen rows) that any tool loads.

Slots are orthogonal when the adapters share a rank (slot width = rank; a rank-8 slot 0 and a rank-4 slot 1 share
rows 4..7). A layer has d // r slots: a slot beyond that does not fit and is an error naming the layer, never a
silent wrap-around (which would make two slots overlap).

Construction: the first (K+1)·r basis rows are the Q of a reduced QR of (K+1)·r Gaussian vectors in R^d, vector j
seeded by (layer name, j). QR orthonormalises in order (Q's first j rows span the first j vectors alone), so the
rows of slot K are the same whichever larger slot another adapter computed them for, and orthogonal to the span
of every earlier slot; it costs O(d·((K+1)·r)²), not the O(d³) of a full d×d QR. Signs are fixed (diag(R) > 0),
so the basis does not depend on the LAPACK build either.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .errors import ConfigError

SEED_TAG = "stylelora-orthogonal-slots-v1"  # part of every seed: changing the construction changes this


def _vector(layer: str, j: int, d: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{SEED_TAG}:{layer}:{j}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(d, generator=gen, dtype=torch.float64)


def basis_rows(layer: str, d: int, count: int) -> torch.Tensor:
    """The first ``count`` rows [count, d] (fp64, orthonormal) of layer ``layer``'s fixed basis of R^d."""
    if count > d:
        raise ConfigError(f"{layer}: {count} orthogonal rows do not fit in its {d}-dimensional input")
    g = torch.stack([_vector(layer, j, d) for j in range(count)], dim=1)  # [d, count]
    q, r = torch.linalg.qr(g, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.contiguous()


def slot_rows(layer: str, d: int, rank: int, slot: int) -> torch.Tensor:
    """Rows [slot·rank, (slot+1)·rank) of the layer's basis, scaled to PEFT's initial row norm (see ``row_norm``)."""
    if slot < 0:
        raise ConfigError(f"slot must be >= 0, got {slot}")
    if (slot + 1) * rank > d:
        raise ConfigError(f"orthogonal slot {slot} at rank {rank} needs {(slot + 1) * rank} input dimensions, but "
                          f"layer {layer} has {d} (it fits slots 0..{d // rank - 1} at this rank): use a lower "
                          "--slot or --rank, or leave this layer out of the targets")
    return basis_rows(layer, d, (slot + 1) * rank)[slot * rank:] * row_norm()


def row_norm() -> float:
    """The expected row norm of PEFT's default ``lora_A`` init (kaiming-uniform, a = √5: U(±1/√d), so a row's
    squared norm is d·1/(3d) = 1/3). Frozen rows of this norm let the recipe's learning rate move ΔW about as
    fast as plain LoRA's does at its start (with Adam, ΔB is lr-sized and ΔW = ΔB·A scales with ‖A‖)."""
    return 1.0 / math.sqrt(3.0)


def max_slot(d: int, rank: int) -> int:
    return d // rank - 1



def freeze_slot(module: torch.nn.Module, component: str, adapter_name: str, *, rank: int, slot: int) -> int:
    """Freeze ``module``'s LoRA layers ``adapter_name`` to slot ``slot``: each layer's ``lora_A`` gets its rows
    (seeded by ``component.path``), ``requires_grad`` off. Every layer is checked first: a slot that does not fit
    one of them is an error naming the layer before any weight changes."""
    from . import lora

    layers = {path: tuple(layer.lora_A[adapter_name].weight.shape)
              for path, layer in lora.lora_layers(module, adapter_name)}
    for path, shape in layers.items():
        d = math.prod(shape[1:])
        if (slot + 1) * rank > d:
            slot_rows(f"{component}.{path}", d, rank, slot)  # raises the error that names the layer
    return lora.freeze_down(module, adapter_name,
                            lambda path, shape: slot_rows(f"{component}.{path}", math.prod(shape[1:]), rank,
                                                          slot).reshape(shape))
