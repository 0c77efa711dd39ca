"""Pure-torch reference for every kernel: the definition the native kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmkit.formats.nm import NMTensor, decompress


def nm_linear(x: torch.Tensor, weight: NMTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, decompress(weight), bias)``: same dtype and accumulation as torch's dense linear."""
    return F.linear(x, decompress(weight).to(x.dtype), bias)


def nm_linear_fp32(x: torch.Tensor, weight: NMTensor) -> torch.Tensor:
    """The same product accumulated in fp32 (what the native kernels do for bf16), as fp32."""
    return F.linear(x.float(), decompress(weight).float())
