"""N:M kernels: a pure-torch reference, native CPU kernels (C, runtime ISA dispatch), CUDA 2:4.

:func:`nm_linear` is the one place that chooses among them (native when it supports the input, CUDA
2:4 for GPU fp16/bf16 2:4 weights, else the reference); :func:`dense_weight` likewise for
decompression. Callers never check eligibility themselves.
"""

from __future__ import annotations

import torch

from nmkit.formats.blocked import BlockedNM, from_blocked
from nmkit.formats.nm import NMTensor, decompress
from nmkit.kernels import cuda, native, reference


def nm_linear(
    x: torch.Tensor, weight: BlockedNM | NMTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a compressed N:M weight, on the fastest path available.

    The native kernels need the blocked kernel layout; a canonical :class:`NMTensor` runs on the
    torch reference (or, for 2:4 on a GPU, on torch's semi-structured sparse GEMM).
    """
    if native.supports(weight, x):
        y = native.linear(x, weight)
        return y if bias is None else y.add_(bias)
    if cuda.supports(weight, x):
        return cuda.linear(x, dense_weight(weight), bias)
    if isinstance(weight, BlockedNM):
        weight = from_blocked(weight)
    return reference.nm_linear(x, weight, bias)


def dense_weight(weight: BlockedNM | NMTensor) -> torch.Tensor:
    """The dense (out, in) weight: one native pass when the kernels support it, else the reference."""
    if isinstance(weight, BlockedNM) and native.supports_decompress(weight):
        return native.decompress(weight)
    return decompress(from_blocked(weight) if isinstance(weight, BlockedNM) else weight)


__all__ = ["cuda", "dense_weight", "native", "nm_linear", "reference"]
