"""Bidirectional N:M (BDWP / Bi-Mask): N:M weights in the forward GEMM *and* in the input-gradient GEMM.

Forward ``Y = X (W*Mf)^T`` uses the row-wise mask; backward ``dX = dY (W*Mb)`` uses a mask that is
N:M along the output dimension (the reduction dimension of that GEMM); ``dW = dY^T X`` stays dense.
A parametrization can only change the weight, not the GEMM that consumes it, so this needs its own
autograd function and a thin module that calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _BidirectionalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, backward_mask):  # type: ignore[override]
        ctx.save_for_backward(x, weight, backward_mask)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, backward_mask = ctx.saved_tensors
        grad_x = grad_out @ (weight * backward_mask) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


def bidirectional_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backward_mask: torch.Tensor
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose input gradient uses ``weight * backward_mask``."""
    return _BidirectionalLinear.apply(x, weight, bias, backward_mask)


class BidirectionalLinear(nn.Module):
    """Wraps a parametrized ``nn.Linear`` (kept as ``.linear``, same parameters) to use the backward mask."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backward_mask = self.linear.parametrizations.weight[0].backward_mask
        return bidirectional_linear(x, self.linear.weight, self.linear.bias, backward_mask)
