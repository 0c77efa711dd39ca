"""V:N:M activations (VENOM's pattern applied to a layer's input, chosen per call).

Tokens run down the rows, features along the columns. Every block of V consecutive tokens x M
consecutive features keeps 4 feature columns, shared by its V tokens (those with the largest sum of
squares over the block), and each token keeps the N largest-magnitude of its 4: density N / M.

Why the shared columns matter on a CPU: a block's product with a weight then needs only the weight's
rows for the kept columns, a dense product with 4 / M of the reduction length, which the dense BLAS
(MKL, oneDNN's AMX) runs at full speed. The inner N of 4 is what a sparse tensor core would also
skip; here it only zeroes values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nmkit.errors import UserError
from nmkit.kernels import native as kernels_native
from nmkit.patterns import VNM
from nmkit.solvers.nm import topk_mask


@dataclass
class VNMSelection:
    """The kept part of an activation matrix (tokens, features), block by block of V tokens."""

    offsets: torch.Tensor  # int64 (blocks, groups, C = 4): kept columns within each M-feature group, ascending
    values: torch.Tensor  # (blocks, V, groups * C): their values, the inner N of 4 kept, the rest 0
    keep: torch.Tensor  # bool, like values: which entries the inner N:4 keeps
    tokens: int  # rows before the last block was padded with zero tokens
    group: int  # M

    @property
    def columns(self) -> torch.Tensor:
        """The kept feature indices, (blocks, groups * C)."""
        groups = self.offsets.shape[1]
        base = self.group * torch.arange(groups, device=self.offsets.device)[None, :, None]
        return (self.offsets + base).reshape(self.offsets.shape[0], -1)

    def scatter(self, rows: torch.Tensor, block: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """``rows`` (r, groups * C), laid out like one block's kept columns, as a dense (r, features)
        matrix with zeros in the columns block ``block`` does not keep; or added into ``into``."""
        r, (groups, c) = rows.shape[0], self.offsets.shape[1:]
        index = self.offsets[block].expand(r, groups, c)
        if into is not None:
            return into.view(r, groups, self.group).scatter_add_(2, index, rows.reshape(r, groups, c)).view_as(into)
        out = rows.new_zeros(r, groups, self.group)
        return out.scatter_(2, index, rows.reshape(r, groups, c)).reshape(r, groups * self.group)

    def gather(self, matrix: torch.Tensor, block: int) -> torch.Tensor:
        """The columns of ``matrix`` (r, features) that block ``block`` keeps: (r, groups * C)."""
        r, (groups, c) = matrix.shape[0], self.offsets.shape[1:]
        picked = matrix.reshape(r, groups, self.group).gather(2, self.offsets[block].expand(r, groups, c))
        return picked.reshape(r, groups * c)

    def dense(self, features: int) -> torch.Tensor:
        """The pruned activations as a dense (tokens, features) tensor (the reference)."""
        blocks, v, _ = self.values.shape
        rows = [self.scatter(self.values[b], b) for b in range(blocks)]
        return torch.cat(rows)[: self.tokens]


def check_vnm_width(features: int, pattern: VNM) -> None:
    """One clear line when a layer's input width cannot hold the pattern's M-feature groups."""
    if features % pattern.group:
        raise UserError(f"input width {features} is not a multiple of M={pattern.group} in V:N:M pattern "
                        f"{pattern}; choose an M that divides it")


def select_vnm(x: torch.Tensor, pattern: VNM) -> VNMSelection:
    """Choose ``x``'s V:N:M-kept entries: ``x`` (tokens, features); tokens need not be a multiple of V
    (the last block is padded with zero tokens, which never win a column from a real one).

    Columns are ranked by their 2-norm over the block's tokens (its square, in fp32 or wider); ties keep the
    lower feature index, so the selection is reproducible bit for bit.
    """
    if x.dim() != 2:
        raise UserError(f"select_vnm takes a (tokens, features) matrix, got shape {tuple(x.shape)}")
    tokens, features = x.shape
    check_vnm_width(features, pattern)
    v, m, groups, c = pattern.v, pattern.group, features // pattern.group, pattern.columns
    pad = -tokens % v
    xb = (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(-1, v, groups, m)
    blocks = xb.shape[0]
    with torch.no_grad():
        # squared norms (the same order), at least fp32 (bf16 ones would tie far more often); a reduction over
        # dim 1 runs ~10x faster than linalg.vector_norm's there
        norms = xb.detach().to(torch.promote_types(x.dtype, torch.float32)).square().sum(1)  # (blocks, groups, M)
        if bool(torch.isnan(norms).any()):
            raise UserError("activations contain NaN (the training has diverged?); V:N:M cannot rank them")
        chosen = _top_mask(norms, c)  # ties to the lower index
        offsets = torch.arange(m, device=x.device).expand(blocks, groups, m)[chosen].reshape(blocks, groups, c)
    picked = xb.gather(3, offsets[:, None].expand(blocks, v, groups, c))
    with torch.no_grad():
        keep = _top_mask(picked.detach().abs(), pattern.keep)
    values = (picked * keep).reshape(blocks, v, groups * c)
    return VNMSelection(offsets=offsets, values=values, keep=keep.reshape(blocks, v, groups * c),
                        tokens=tokens, group=m)


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`~nmkit.solvers.nm.topk_mask` of non-negative, NaN-free ``scores`` (ties to the lower index).
    On CPU one pass of the native top-N kernel over an fp32 copy: the pairwise ranking in torch was most of
    a bf16 V:N:M training step's overhead."""
    size = scores.shape[-1]
    exact_in_fp32 = scores.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if not exact_in_fp32 or scores.device.type != "cpu" or not 0 < k < size \
            or size > kernels_native.TOPN_MAX_GROUP or not kernels_native.available():
        return topk_mask(scores, k)
    ranked = scores.to(torch.float32, copy=True).contiguous()
    return kernels_native.topn_fill_(ranked, k, size, -1.0) >= 0  # kept scores stay >= 0, the rest -1
