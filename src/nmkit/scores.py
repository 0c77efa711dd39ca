"""Importance scores: how much each weight matters, as a non-negative tensor shaped like the weight.

One home for the scores that one-shot pruning, channel permutations and sparse training keep; the
solvers (:func:`nmkit.solvers.mask_for`) then keep the most score a pattern allows. Each takes the
weight as (out, in) and per-input-channel statistics as plain tensors, so it depends on nothing
but torch.
"""

from __future__ import annotations

import torch


def magnitude(w: torch.Tensor) -> torch.Tensor:
    """|W|: the data-free baseline."""
    return w.detach().abs()


def wanda(w: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2024): |W_ij| * ||X_j||, from the squared input norms ||X_j||^2."""
    return w.abs() * sq_norms.sqrt().to(w.dtype)


def esparse_channel_factor(sq_norms: torch.Tensor, entropy: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Per-input-channel weight of the E-Sparse metric: normalised norm plus alpha x normalised entropy."""
    norms = sq_norms.sqrt()
    ent = entropy.to(norms.dtype)
    return norms / norms.mean().clamp(min=1e-12) + alpha * ent / ent.mean().clamp(min=1e-12)


def esparse(w: torch.Tensor, sq_norms: torch.Tensor, entropy: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """E-Sparse-style metric (Li et al. 2023), our reading of it (the paper's exact formula was not
    available to us): score_ij = |W_ij| * (||X_j|| / mean ||X|| + alpha * H_j / mean H)."""
    return w.abs() * esparse_channel_factor(sq_norms, entropy, alpha).to(w.dtype)


def obs_saliency(w: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """Optimal Brain Surgeon saliency w^2 / [H^-1]_jj: the loss increase of removing each weight alone."""
    return w**2 / hinv_diag


def damped_inverse_diagonal(xtx: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """diag((H + damp * mean(diag H) * I)^-1) in float64, returned as float32: the order-independent
    [H^-1]_jj (SparseGPT's sweep uses its Cholesky factor instead, which depends on the column order)."""
    h = xtx.double()
    h = h + damp * h.diagonal().mean().clamp(min=1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.inv(h).diagonal().float()
