"""2:4 on NVIDIA GPUs through ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS).

Import-safe without CUDA: :func:`available` is False and nothing touches the GPU. torch's
semi-structured tensors need fp16/bf16 (or int8) weights whose dimensions are multiples of the
backend minimums and refuse other shapes, so :class:`SemiStructuredLinear` zero-pads the weight to
multiples of 64 (rows and columns), pads the input's features to match and slices the output.
Status: written against torch's documented API; not yet run on a GPU in this project.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD = 64  # covers the CUTLASS (32 x 64) and cuSPARSELt (16 x 16) sparse-operand minimums
DTYPES = (torch.float16, torch.bfloat16)


def available() -> bool:
    """A CUDA device of compute capability >= 8.0 and a torch with semi-structured sparsity."""
    if not torch.cuda.is_available() or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class SemiStructuredLinear(nn.Module):
    """A 2:4-pruned Linear whose weight is a torch ``SparseSemiStructuredTensor`` on the GPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SemiStructuredLinear:
        if not available():
            raise RuntimeError("the CUDA 2:4 path needs a GPU with compute capability >= 8.0")
        w = linear.weight.detach()
        if w.dtype not in DTYPES:
            raise ValueError(f"semi-structured 2:4 needs fp16 or bf16 weights, got {w.dtype}")
        out_f, in_f = w.shape
        padded = torch.zeros(_round_up(out_f, PAD), _round_up(in_f, PAD), dtype=w.dtype, device="cuda")
        padded[:out_f, :in_f] = w
        # Zero padding keeps every group of 4 at <= 2 non-zeros; the original must already be 2:4.
        sparse = torch.sparse.to_sparse_semi_structured(padded)
        bias = None if linear.bias is None else linear.bias.detach().to("cuda")
        return cls(sparse, bias, in_f, out_f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.weight.shape[1] - self.in_features
        if pad:
            x = F.pad(x, (0, pad))
        y = F.linear(x, self.weight)[..., : self.out_features]
        return y if self.bias is None else y + self.bias


def supports(weight, x: torch.Tensor) -> bool:
    """Whether :func:`linear` runs this compressed 2:4 weight (values on the GPU, fp16/bf16) and input."""
    pattern = getattr(weight, "pattern", None)
    return (
        x.device.type == "cuda"
        and weight.values.device.type == "cuda"
        and pattern is not None
        and (pattern.keep, pattern.group) == (2, 4)
        and weight.values.dtype in DTYPES
        and x.dtype == weight.values.dtype
        and available()
    )


def linear(x: torch.Tensor, dense_weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with a 2:4 ``dense_weight`` (zeros where pruned) as a semi-structured
    operand. Converts the weight on every call: layers that run many times hold a
    :class:`SemiStructuredLinear` instead."""
    out_f, in_f = dense_weight.shape
    padded = torch.zeros(_round_up(out_f, PAD), _round_up(in_f, PAD), dtype=dense_weight.dtype, device="cuda")
    padded[:out_f, :in_f] = dense_weight
    if in_f != padded.shape[1]:
        x = F.pad(x, (0, padded.shape[1] - in_f))
    y = F.linear(x, torch.sparse.to_sparse_semi_structured(padded))[..., :out_f]
    return y if bias is None else y + bias
