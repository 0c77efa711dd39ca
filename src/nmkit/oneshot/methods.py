"""Per-layer pruning methods. Each takes the weight as (out, in), the layer's calibration
statistics and a pattern, and returns the pruned weight (same shape, zeros where pruned).

- ``magnitude``: keep the largest |W|.
- ``wanda``: keep the largest |W_ij| * ||X_j|| within each output row's groups; no weight update.
- ``sparsegpt``: OBS with the blocked inverse-Hessian Cholesky factor; N:M chosen lazily inside each
  block of columns from the already-updated weights; the remaining weights absorb the error.
"""

from __future__ import annotations

import torch

from nmkit.oneshot.stats import InputStats
from nmkit.patterns import NM, Pattern, TailPolicy
from nmkit.solvers import mask_for, topk_mask


def magnitude(w: torch.Tensor, stats: InputStats | None, pattern: Pattern, tail: TailPolicy = "error",
              **_) -> torch.Tensor:
    return w * mask_for(w.abs(), pattern, dim=-1, tail=tail)


def wanda(w: torch.Tensor, stats: InputStats, pattern: Pattern, tail: TailPolicy = "error", **_) -> torch.Tensor:
    scores = w.abs() * stats.sq_norms.sqrt().to(w.dtype)
    return w * mask_for(scores, pattern, dim=-1, tail=tail)


def inverse_hessian_factor(xtx: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1, so that H^-1 = U^T U.

    Computed in float64 (cheap at these sizes); the damping grows tenfold until H is positive definite.
    """
    h = xtx.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    scale = h.diagonal().mean().clamp(min=1e-12)
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * (10**attempt) * scale * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True).float()
    raise RuntimeError("the calibration Hessian is not positive definite even with heavy damping")


def sparsegpt(
    w: torch.Tensor,
    stats: InputStats,
    pattern: Pattern,
    tail: TailPolicy = "error",
    blocksize: int = 128,
    damp: float = 0.01,
    **_,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023) for any pattern.

    For N:M the mask of each group is picked when the sweep reaches it, from w^2 / [H^-1]_jj on the
    weights as updated so far. Other patterns (unstructured %, transposable, V:N:M, ...) get their
    mask up front from the same saliency, then the same OBS sweep updates the kept weights.
    """
    w = w.float().clone()
    xtx = stats.xtx.clone()
    dead = xtx.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    xtx[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_hessian_factor(xtx, damp)
    rows, cols = w.shape
    lazy = isinstance(pattern, NM)
    if lazy:
        m, n = pattern.group, pattern.keep
        blocksize = max(m, blocksize // m * m)  # groups never straddle two blocks
        keep = torch.zeros_like(w, dtype=torch.bool)
    else:
        keep = mask_for(w**2 / u.diagonal() ** 2, pattern, dim=-1, tail=tail)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if lazy and i % m == 0:
                width = min(m, i2 - i1 - i)
                if width == m or tail == "pad":
                    saliency = w1[:, i : i + width] ** 2 / u1.diagonal()[i : i + width] ** 2
                    keep[:, i1 + i : i1 + i + width] = topk_mask(saliency, n)
                else:  # partial tail group under tail="dense" (tail="error" was rejected earlier)
                    keep[:, i1 + i : i1 + i + width] = True
            col = w1[:, i]
            q = col * keep[:, i1 + i]
            err = (col - q) / u1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q  # exact zeros where pruned, whatever the rounding of the update
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w * keep


METHODS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}
CALIBRATED = {"wanda", "sparsegpt"}


def reconstruction_error(w_old: torch.Tensor, w_new: torch.Tensor, stats: InputStats) -> float:
    """||(W - W') X||^2 / ||W X||^2 over the calibration tokens, from X^T X alone."""
    h = stats.xtx
    delta = (w_old.float() - w_new.float())
    num = ((delta @ h) * delta).sum()
    den = ((w_old.float() @ h) * w_old.float()).sum().clamp(min=1e-30)
    return (num / den).item()
