"""First-moment estimate of the best 2:4 channel-permutation efficacy on an i.i.d. score matrix.

Given each row's values, an i.i.d. matrix has them in uniformly random order, independently across
rows, so every column partition (a permutation up to the order of groups and of columns inside a
group) has the same distribution of kept score: a sum of independent row terms. The expected number
of partitions reaching a kept score K is #partitions x P(the identity reaches K); where it is far below
one, no partition reaches K. With a Gaussian tail for that sum, ``e_star`` is the efficacy at which
the expected count is one. An estimate for i.i.d. matrices only (real weights have structured columns),
checked in docs/benchmarks-history.md to lie above every exact optimum and LP bound measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nmkit.solvers.permutation import kept_by_nm, kept_by_rows


@dataclass(frozen=True)
class CeilingEstimate:
    e_star: float  # efficacy (0..1) where the expected number of partitions reaching it is 1
    log_count_at_20: float  # ln of the expected number of partitions at >= 20% efficacy
    log_partitions: float  # ln of the number of distinct 2:4 column partitions
    identity_z: float  # the identity's kept score, in standard deviations from the random-order mean


def log_partitions(cols: int, m: int = 4) -> float:
    """ln of the number of ways to split ``cols`` columns into unordered groups of ``m`` unordered columns."""
    g = cols // m
    return math.lgamma(cols + 1) - g * math.lgamma(m + 1) - math.lgamma(g + 1)


def _choose3(k: np.ndarray) -> np.ndarray:
    k = k.astype(np.float64)
    return k * (k - 1) * (k - 2) / 6


def random_order_mean(w: np.ndarray) -> float:
    """Exact mean of the 2:4 kept score over random orders of every row. Sorted descending, the value
    with i larger ones in its row is kept when at most one of its 3 group mates (a uniform 3-subset of
    the other cols-1 values) is larger."""
    cols = w.shape[1]
    larger = np.arange(cols)
    smaller = cols - 1 - larger
    p_kept = (_choose3(smaller) + larger * smaller * (smaller - 1) / 2) / _choose3(np.full(cols, cols - 1))
    return float((-np.sort(-w, axis=1) @ p_kept).sum())


def random_order_variance(w: np.ndarray, samples: int, sample_rows: int, rng: np.random.Generator) -> float:
    """Variance of the 2:4 kept score over random orders of every row, from ``samples`` random
    partitions of ``sample_rows`` randomly chosen rows, scaled to all rows."""
    rows, cols = w.shape
    pick = rng.choice(rows, size=min(sample_rows, rows), replace=False)
    variances = []
    for r in pick:
        perms = np.argsort(rng.random((samples, cols)), axis=1)
        v = np.sort(w[r][perms].reshape(samples, cols // 4, 4), axis=2)
        variances.append((v[:, :, 2] + v[:, :, 3]).sum(1).var(ddof=1))
    return float(np.mean(variances)) * rows


def first_moment_ceiling(
    scores: torch.Tensor, samples: int = 400, sample_rows: int = 128, seed: int = 0
) -> CeilingEstimate:
    """Estimate the best 2:4 permutation efficacy of an i.i.d. non-negative ``scores`` (rows, cols)."""
    if scores.dim() != 2 or scores.shape[1] % 4:
        raise ValueError(
            f"first_moment_ceiling needs (rows, cols) with cols a multiple of 4, got {tuple(scores.shape)}"
        )
    k_id, k_rows = kept_by_nm(scores, "2:4"), kept_by_rows(scores, 0.5)
    w = scores.detach().double().cpu().numpy()
    mean, var = random_order_mean(w), random_order_variance(w, samples, sample_rows, np.random.default_rng(seed))
    lp = log_partitions(w.shape[1])
    e_star = (math.sqrt(2 * var * lp) - (k_id - mean)) / (k_rows - k_id)
    t20 = 0.2 * (k_rows - k_id) + (k_id - mean)  # kept score above the mean at 20% efficacy
    return CeilingEstimate(e_star, lp - t20 * t20 / (2 * var), lp, (k_id - mean) / math.sqrt(var))
