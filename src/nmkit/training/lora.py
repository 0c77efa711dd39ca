"""Sparsity-preserving LoRA: the low-rank update is projected onto the mask, so a merge keeps exact N:M.

``W' = W0 + scale * (B @ A) * mask`` with ``W0`` frozen. Because ``W0`` is zero outside the mask and the
update is masked, the merged weight has no new non-zeros: a pruned model stays N:M after merge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmkit.errors import UserError
from nmkit.selection import selected


class MaskedLoRA(nn.Module):
    """Parametrization ``W -> W + scale * (B @ A) * mask``; only ``A`` and ``B`` train."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, mask: torch.Tensor) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        self.scale = alpha / rank
        self.register_buffer("mask", mask.to(torch.bool).clone())
        # Kaiming-uniform A and zero B, as in LoRA: the model starts exactly at W.
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.lora_B @ self.lora_A) * self.scale * self.mask


def add_sparse_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = ("*lm_head*",),
) -> list[str]:
    """Freeze the selected ``nn.Linear`` weights and attach masked LoRA adapters; returns the layer names.

    The mask of each layer is its current non-zero pattern (prune first). Train only the parameters
    whose name contains ``lora_``; call :func:`merge_sparse_lora` to fold them in.
    """
    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}")
    exclude = tuple(exclude)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not selected(name, include, exclude):
            continue
        w = module.weight
        w.requires_grad_(False)
        lora = MaskedLoRA(w.detach(), rank, alpha, w.detach() != 0)
        parametrize.register_parametrization(module, "weight", lora)
        names.append(name)
    if not names:
        raise UserError("no nn.Linear layer matched include/exclude for LoRA")
    return names


@torch.no_grad()
def merge_sparse_lora(model: nn.Module) -> list[str]:
    """Fold every masked LoRA adapter into its weight and remove it; returns the merged layer names."""
    names = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, MaskedLoRA) for p in module.parametrizations.weight
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            names.append(name)
    return names
