"""Row-wise N:M masks: top-N per group of M along one dimension, ties broken by lower index."""

from __future__ import annotations

import torch

from nmkit.patterns import NM, PatternError, TailPolicy, check_tail

# Up to this group size the pairwise-rank method beats a stable sort.
_RANK_MAX_GROUP = 16


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries along the last dim; among equal scores the lower index wins.

    Deterministic bit for bit (``torch.topk`` leaves tie order unspecified, and weights from
    quantised checkpoints tie often).
    """
    if scores.is_complex():
        raise PatternError("scores must be real-valued")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise PatternError("scores contain NaN; check the weights or activations that produced them")
    size = scores.shape[-1]
    if k >= size:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if size <= _RANK_MAX_GROUP:
        return _rank_mask(scores, k)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def _rank_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Pairwise ranks, one column at a time: rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}; keep rank < k.

    Works on the (size, groups) transpose so each comparison is one contiguous vector op; about
    3x faster than a stable sort for groups of up to 16.
    """
    size = scores.shape[-1]
    cols = scores.reshape(-1, size).T.contiguous()
    out = torch.empty(cols.shape, dtype=torch.bool, device=scores.device)
    for i in range(size):
        rank = torch.zeros(cols.shape[1], dtype=torch.uint8, device=scores.device)
        for j in range(size):
            if j != i:
                rank += (cols[j] >= cols[i]) if j < i else (cols[j] > cols[i])
        out[i] = rank < k
    return out.T.reshape(scores.shape)


def nm_mask(
    scores: torch.Tensor, pattern: NM | str, dim: int = -1, tail: TailPolicy = "error"
) -> torch.Tensor:
    """Boolean N:M mask: in each group of M consecutive entries along ``dim`` keep the N largest scores.

    ``tail`` decides what happens when the size along ``dim`` is not a multiple of M:
    ``"error"`` (default) raises, ``"pad"`` treats the remainder as a partial group that keeps at
    most N, ``"dense"`` keeps the remainder whole.
    """
    pattern = NM.parse(pattern)
    n, m = pattern.keep, pattern.group
    if scores.dim() == 0:
        raise PatternError(f"an N:M mask needs a tensor with at least one dimension (groups of M={m} along "
                           "`dim`), got a 0-d tensor (a single number)")
    s = scores.movedim(dim, -1)
    size = s.shape[-1]
    check_tail(size, m, tail)
    full = size - size % m
    lead = s.shape[:-1]
    mask = topk_mask(s[..., :full].reshape(*lead, full // m, m), n).reshape(*lead, full)
    if full < size:
        rest = s[..., full:]
        rest_mask = torch.ones_like(rest, dtype=torch.bool) if tail == "dense" else topk_mask(rest, n)
        mask = torch.cat([mask, rest_mask], dim=-1)
    return mask.movedim(-1, dim)

