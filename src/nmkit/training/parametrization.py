"""The weight transform attached with ``torch.nn.utils.parametrize``: master weight in, training weight out.

Every method shares one skeleton: the optimiser updates the dense master weight ``W``; the forward
uses ``f(W)``; the backward passes straight through to ``W`` (except ``fixed``, whose gradient is
masked so pruned weights stay exactly where they are). The mask and the scalars live in buffers, so
changing them between steps neither re-registers anything nor recompiles under ``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import nn

from nmkit.patterns import NM
from nmkit.training.masks import soft_threshold

# How f(W) is formed; SparseTraining switches modes as the schedule moves on.
MODES = ("fixed", "ste", "decay", "soft", "dense")


class NMWeight(nn.Module):
    """Parametrization ``W -> f(W)`` for one weight, holding its N:M mask (and backward mask)."""

    def __init__(self, weight: torch.Tensor, pattern: NM, mode: str, mask: torch.Tensor) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.pattern = pattern
        self.register_buffer("mask", mask.clone())
        self.register_buffer("backward_mask", mask.clone())  # used only by bidirectional layers
        self.register_buffer("alpha", torch.zeros((), dtype=weight.dtype))  # decay: weight of pruned entries
        self.register_buffer("beta", torch.ones((), dtype=weight.dtype))  # sste: frozen per-tensor scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        if mode == "dense":
            return w
        if mode == "fixed":
            return w * self.mask
        if mode == "ste":
            target = w * self.mask
        elif mode == "decay":
            target = w * (self.mask + (~self.mask) * self.alpha)
        else:  # soft
            target = self.beta * soft_threshold(w, self.pattern)
        # Straight-through: value of target, gradient of identity, so pruned weights can regrow.
        return w + (target - w).detach()

    def deployed(self, w: torch.Tensor) -> torch.Tensor:
        """The weight that ships: hard mask, or beta * soft threshold for sste (both exactly N:M)."""
        with torch.no_grad():
            if self.mode == "soft":
                return self.beta * soft_threshold(w, self.pattern)
            return w * self.mask

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, mode={self.mode}"
