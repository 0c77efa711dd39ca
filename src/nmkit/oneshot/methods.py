"""Per-layer pruning methods and the one record per method that everything else reads.

Each layer function takes the weight as (out, in), the layer's calibration statistics and a
pattern, and returns the pruned weight (same shape, zeros where pruned):

- ``magnitude``: keep the largest |W|.
- ``wanda``: keep the largest |W_ij| * ||X_j|| within each output row's groups; no weight update.
- ``sparsegpt``: OBS with the blocked inverse-Hessian Cholesky factor; N:M chosen lazily inside each
  block of columns from the already-updated weights; the remaining weights absorb the error.

:data:`METHODS` maps each name to a :class:`Method` (needs calibration? updates weights? which score
it keeps, which layer function solves it); the CLI, the pruning loops and permutation scoring read it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nmkit import scores
from nmkit.oneshot.stats import InputStats
from nmkit.patterns import NM, Pattern, TailPolicy
from nmkit.solvers import mask_for, topk_mask


def magnitude(w: torch.Tensor, stats: InputStats | None, pattern: Pattern, tail: TailPolicy = "error",
              **_) -> torch.Tensor:
    return w * mask_for(scores.magnitude(w), pattern, dim=-1, tail=tail)


def wanda(w: torch.Tensor, stats: InputStats, pattern: Pattern, tail: TailPolicy = "error", **_) -> torch.Tensor:
    return w * mask_for(scores.wanda(w, stats.sq_norms), pattern, dim=-1, tail=tail)


@contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def esparse(w: torch.Tensor, stats: InputStats, pattern: Pattern, tail: TailPolicy = "error", alpha: float = 1.0,
            **_) -> torch.Tensor:
    """E-Sparse-style metric (:func:`nmkit.scores.esparse`), no weight update. The paper's channel
    shuffles are a permutation step: ``prune(..., permute=True)``."""
    return w * mask_for(scores.esparse(w, stats.sq_norms, stats.entropy(), alpha), pattern, dim=-1, tail=tail)


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
    rows, cols = w.shape
    # One thread for the sweep (many small ops: threads only add barrier waits, 40x slower on a busy box) and
    # for the factor too: LAPACK's threaded factorisation rounds a few entries differently by thread count,
    # and one flipped near-tie then changes every later block (a distributed rank runs with fewer threads).
    with single_thread():
        u = inverse_hessian_factor(xtx, damp)
        return _obs_sweep(w, u, pattern, tail, blocksize)


def _obs_sweep(w: torch.Tensor, u: torch.Tensor, pattern: Pattern, tail: TailPolicy, blocksize: int) -> torch.Tensor:
    """Columns left to right; each pruned weight's error is spread over the columns after it.

    Updates are applied lazily at two levels (exact rewrites of the one-column-at-a-time sweep):
    inside a group of columns per column, to the rest of the block once per group, and to the
    columns after the block once per block.
    """
    cols = w.shape[1]
    lazy = type(pattern) is NM  # only plain row-wise N:M can be chosen group by group (not subclasses)
    group = pattern.group if lazy else 8
    blocksize = max(group, blocksize // group * group)  # groups never straddle two blocks
    if lazy:
        keep = torch.zeros_like(w, dtype=torch.bool)
    else:
        keep = mask_for(scores.obs_saliency(w, u.diagonal() ** 2), pattern, tail=tail)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for g1 in range(0, i2 - i1, group):
            g2 = min(g1 + group, i2 - i1)
            if lazy:
                keep[:, i1 + g1 : i1 + g2] = _select_group(w1[:, g1:g2], u1.diagonal()[g1:g2], pattern, tail)
            wg, ug, kg = w1[:, g1:g2], u1[g1:g2, g1:g2], keep[:, i1 + g1 : i1 + g2]
            for j in range(g2 - g1):
                col = wg[:, j]
                q = col * kg[:, j]
                err = (col - q) / ug[j, j]
                wg[:, j:] -= err.unsqueeze(1) * ug[j, j:].unsqueeze(0)
                wg[:, j] = q  # exact zeros where pruned, whatever the rounding of the update
                err1[:, g1 + j] = err
            w1[:, g2:] -= err1[:, g1:g2] @ u1[g1:g2, g2:]
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w * keep


def _select_group(wg: torch.Tensor, u_diag: torch.Tensor, pattern: NM, tail: TailPolicy) -> torch.Tensor:
    """N:M choice for one group of columns from the OBS saliency w^2 / [H^-1]_jj of the updated weights."""
    if wg.shape[1] < pattern.group and tail == "dense":  # partial tail group left dense
        return torch.ones_like(wg, dtype=torch.bool)
    return topk_mask(scores.obs_saliency(wg, u_diag**2), pattern.keep)


def refit(w: torch.Tensor, keep: torch.Tensor, xtx: torch.Tensor, target: torch.Tensor, damp: float = 0.01,
          iters: int = 40) -> torch.Tensor:
    """Least-squares refit of the kept weights, mask fixed: min ||(W' - T) X||^2 over W' with W' = 0
    off ``keep``, by conjugate gradients run for all rows at once (each row is its own problem).

    SparseGPT freezes each column once the sweep passes it; this lets every kept weight move
    jointly. Starts from ``w``, so it never ends worse than it began (CG descends monotonically).
    """
    xtx = xtx.to(w.dtype)
    h = xtx + damp * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    mask = keep.to(w.dtype)
    w = w * mask
    r = -((w - target) @ h) * mask  # minus half the gradient, restricted to kept weights
    p = r.clone()
    rs = (r * r).sum(1)
    tiny = torch.finfo(w.dtype).tiny
    for _ in range(iters):
        hp = (p @ h) * mask
        alpha = rs / (p * hp).sum(1).clamp(min=tiny)
        w = w + alpha.unsqueeze(1) * p
        r = r - alpha.unsqueeze(1) * hp
        rs_new = (r * r).sum(1)
        p = r + (rs_new / rs.clamp(min=tiny)).unsqueeze(1) * p
        rs = rs_new
    return w * mask


def sparsegpt_refit(w: torch.Tensor, stats: InputStats, pattern: Pattern, tail: TailPolicy = "error",
                    blocksize: int = 128, damp: float = 0.01, **_) -> torch.Tensor:
    """SparseGPT's mask and update, then a joint least-squares refit of the kept weights."""
    pruned = sparsegpt(w, stats, pattern, tail=tail, blocksize=blocksize, damp=damp)
    return refit(pruned, pruned != 0, stats.xtx, w.float(), damp)


def admm_mask(w: torch.Tensor, xtx: torch.Tensor, pattern: Pattern, tail: TailPolicy = "error", damp: float = 0.01,
              iters: int = 80, rho0: float = 1e-3, rho_growth: float = 1.1) -> torch.Tensor:
    """Mask and weights from ADMM on the layer reconstruction (in the spirit of ALPS, Meng et al. 2024):

        min ||(W' - W) X||^2  s.t. W' in the pattern,  split as W' (free) = D (in the pattern).

    W' = (W H + rho (D - U)) (H + rho I)^-1 (one eigendecomposition of H serves every rho),
    D = projection of W' + U onto the pattern (largest |.| kept), U += W' - D. The penalty rho grows
    geometrically from ``rho0`` x mean(diag H), so early steps explore masks and late ones settle.
    Unlike SparseGPT's single left-to-right sweep, every column's mask choice sees every other's.
    Returns D (pattern-valid, not yet refitted).
    """
    h = xtx.double()
    h = h + damp * h.diagonal().mean().clamp(min=1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam, q = torch.linalg.eigh(h)
    w = w.double()
    wh = w @ h
    d = w * mask_for(w.abs(), pattern, dim=-1, tail=tail)
    u = torch.zeros_like(w)
    rho = rho0 * float(h.diagonal().mean())
    for _ in range(iters):
        w_free = (((wh + rho * (d - u)) @ q) / (lam + rho)) @ q.T
        z = w_free + u
        d = z * mask_for(z.abs(), pattern, dim=-1, tail=tail)
        u += w_free - d
        rho *= rho_growth
    return d.float()


def admm(w: torch.Tensor, stats: InputStats, pattern: Pattern, tail: TailPolicy = "error", damp: float = 0.01,
         iters: int = 80, **_) -> torch.Tensor:
    """ADMM mask/weight search on the layer reconstruction, then the least-squares refit on its mask."""
    d = admm_mask(w.float(), stats.xtx, pattern, tail=tail, damp=damp, iters=iters)
    return refit(d, d != 0, stats.xtx, w.float(), damp)


def reconstruction_error(w_old: torch.Tensor, w_new: torch.Tensor, stats: InputStats) -> float:
    """||(W - W') X||^2 / ||W X||^2 over the calibration tokens, from X^T X alone."""
    h = stats.xtx.float()
    delta = (w_old.float() - w_new.float())
    num = ((delta @ h) * delta).sum()
    den = ((w_old.float() @ h) * w_old.float()).sum().clamp(min=1e-30)
    return (num / den).item()


# The score each method keeps, for channel permutations (which search for the column order that lets
# N:M keep the most of it): (weight (out, in), the layer's statistics, damp) -> non-negative (out, in).
Score = Callable[[torch.Tensor, InputStats | None, float], torch.Tensor]
LayerFn = Callable[..., torch.Tensor]


def _obs_score(w: torch.Tensor, stats: InputStats, damp: float) -> torch.Tensor:
    # The order-independent saliency: the sweep's Cholesky diagonal depends on the column order, so it
    # cannot be the objective of a column-order search.
    return scores.obs_saliency(w, scores.damped_inverse_diagonal(stats.xtx, damp))


@dataclass(frozen=True)
class Method:
    """One one-shot pruning method, as the CLI, the pruning loops and permutation scoring see it."""

    name: str
    help: str  # one phrase for ``nmkit prune --help``
    calibrated: bool  # needs calibration data (runs layer by layer through prune_sequential)
    updates_weights: bool  # kept weights change (OBS / refit), not only a mask
    score: Score
    solve: LayerFn
    histograms: bool = False  # needs per-channel value histograms of the inputs
    options: tuple[str, ...] = ()  # method options the CLI passes through (--damp, --blocksize)
    block_refit: bool = False  # after the layer solves, fit each block to the dense block's output (block_refit.py)


_SPARSEGPT_OPTIONS = ("damp", "blocksize")
_BLOCK_OPTIONS = (*_SPARSEGPT_OPTIONS, "block_epochs", "block_lr", "model_epochs", "model_lr")
_METHODS = (
    Method("magnitude", "no data", False, False, lambda w, stats, damp: scores.magnitude(w), magnitude),
    Method("wanda", "|W| x input norm", True, False, lambda w, stats, damp: scores.wanda(w, stats.sq_norms), wanda),
    Method("esparse", "entropy-enhanced Wanda", True, False,
           lambda w, stats, damp: scores.esparse(w, stats.sq_norms, stats.entropy()), esparse, histograms=True),
    Method("sparsegpt", "OBS with weight update", True, True, _obs_score, sparsegpt, options=_SPARSEGPT_OPTIONS),
    Method("sparsegpt-refit", "SparseGPT + joint least-squares refit", True, True, _obs_score, sparsegpt_refit,
           options=_SPARSEGPT_OPTIONS),
    Method("admm", "ADMM mask search + refit: ~3.5x SparseGPT's time", True, True, _obs_score, admm,
           options=_SPARSEGPT_OPTIONS),
    Method("sparsegpt-block", "sparsegpt-refit, then each block fitted to the dense block's output", True, True,
           _obs_score, sparsegpt_refit, options=_BLOCK_OPTIONS, block_refit=True),
    Method("admm-block", "admm, then each block fitted to the dense block's output", True, True, _obs_score, admm,
           options=_BLOCK_OPTIONS, block_refit=True),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}


def method_help() -> str:
    """The ``--method`` help line, from the records."""
    plain = [m for m in _METHODS if not m.calibrated]
    calibrated = [m for m in _METHODS if m.calibrated]
    return (", ".join(f"{m.name} ({m.help})" for m in plain) + "; calibrated: "
            + ", ".join(f"{m.name} ({m.help})" for m in calibrated))
