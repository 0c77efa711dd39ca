"""Mask and weight transforms on plain tensors: magnitude N:M masks, soft thresholding, subsets.

All masks group along the last (reduction) dimension, as ``nn.Linear.weight`` (out, in) needs, and
break ties by lower index (via :func:`nmkit.solvers.nm.nm_mask`).
"""

from __future__ import annotations

import torch

from nmkit import scores
from nmkit.patterns import NM
from nmkit.solvers.nm import nm_mask


def magnitude_mask(weight: torch.Tensor, pattern: NM, within: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean N:M mask keeping the largest ``|weight|`` of each group.

    ``within`` (bool, same shape) restricts the choice to a parent mask: the result is always a
    subset of it (a group where the parent keeps fewer than N keeps only the parent's entries).
    """
    score = scores.magnitude(weight)
    if within is None:
        return nm_mask(score, pattern, dim=-1)
    # |w| >= 0, so -1 ranks every position outside the parent last.
    score = score.masked_fill(~within, -1.0)
    return nm_mask(score, pattern, dim=-1) & within


def column_mask(weight: torch.Tensor, pattern: NM, within: torch.Tensor | None = None) -> torch.Tensor:
    """N:M mask grouped along the output dimension (rows of ``weight.T``), for the backward GEMM."""
    return magnitude_mask(weight.T, pattern, None if within is None else within.T).T


def soft_threshold(weight: torch.Tensor, pattern: NM) -> torch.Tensor:
    """S-STE projection: per group subtract the largest pruned magnitude ``t`` from every ``|w|``.

    ``t`` is the (M-N)-th smallest ``|w|`` of the group, so at most N entries stay non-zero and the
    map is continuous in ``weight`` (a pruned weight crossing the threshold enters at zero).
    """
    n, m = pattern.keep, pattern.group
    groups = weight.reshape(*weight.shape[:-1], weight.shape[-1] // m, m)
    t = groups.abs().kthvalue(m - n, dim=-1, keepdim=True).values
    out = torch.sign(groups) * torch.clamp(groups.abs() - t, min=0.0)
    return out.reshape(weight.shape)


def soft_threshold_scale(weight: torch.Tensor, pattern: NM) -> float:
    """MSE-optimal per-tensor scale beta = <W, S> / <S, S> of the soft-thresholded weights S."""
    w = weight.detach().float()
    s = soft_threshold(w, pattern)
    denom = float((s * s).sum())
    return float((w * s).sum()) / denom if denom > 0 else 1.0


def flips(new: torch.Tensor, old: torch.Tensor) -> int:
    """Number of positions whose kept/pruned state changed."""
    return int((new ^ old).sum())
