"""N:M kernels: a pure-torch reference, native CPU kernels (C, runtime ISA dispatch), CUDA 2:4.

:func:`nm_linear` is the one dispatch point: native when it supports the input, else reference.
"""

from __future__ import annotations

import torch

from nmkit.formats.blocked import BlockedNM, from_blocked
from nmkit.formats.nm import NMTensor
from nmkit.kernels import native, reference


def nm_linear(
    x: torch.Tensor, weight: BlockedNM | NMTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a compressed N:M weight, on the fastest path available.

    The native kernels need the blocked kernel layout; a canonical :class:`NMTensor` runs on the
    torch reference.
    """
    if native.supports(weight, x):
        y = native.linear(x, weight)
        return y if bias is None else y.add_(bias)
    if isinstance(weight, BlockedNM):
        weight = from_blocked(weight)
    return reference.nm_linear(x, weight, bias)


__all__ = ["nm_linear", "native", "reference"]
