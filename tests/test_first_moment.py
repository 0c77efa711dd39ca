"""The first-moment permutation-ceiling estimate used by `nmkit bench masks` (nmkit.bench.first_moment)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nmkit.bench.first_moment import first_moment_ceiling, log_partitions, random_order_mean
from nmkit.solvers.permutation import kept_by_nm, kept_by_rows


def _partitions(cols: list[int]) -> list[list[int]]:
    """Every split of `cols` into unordered groups of 4 (as a column order, group by group)."""
    if not cols:
        return [[]]
    first, rest = cols[0], cols[1:]
    out = []
    for i in range(len(rest)):
        for j in range(i + 1, len(rest)):
            for k in range(j + 1, len(rest)):
                group = [first, rest[i], rest[j], rest[k]]
                left = [c for c in rest if c not in group]
                out += [group + tail for tail in _partitions(left)]
    return out


@pytest.mark.parametrize("cols", [8, 12])
def test_partition_count_and_exact_mean(cols: int) -> None:
    parts = _partitions(list(range(cols)))
    assert math.isclose(math.exp(log_partitions(cols)), len(parts), rel_tol=1e-9)
    w = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)).double()
    # a uniformly random order of a row is a uniformly random partition: the mean is the plain average
    brute = float(np.mean([kept_by_nm(w[:, p], "2:4") for p in parts]))
    assert random_order_mean(w.numpy()) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimate_lies_above_the_exact_optimum(seed: int) -> None:
    # 4,096 rows x 8 columns: all 35 partitions enumerated; the estimate must not be below the best
    w = torch.randn(4096, 8, generator=torch.Generator().manual_seed(seed)).abs()
    k_id, k_rows = kept_by_nm(w, "2:4"), kept_by_rows(w, 0.5)
    best = max(kept_by_nm(w[:, p], "2:4") for p in _partitions(list(range(8))))
    est = first_moment_ceiling(w, seed=seed)
    assert est.e_star >= (best - k_id) / (k_rows - k_id)
    assert est.log_count_at_20 < 0


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        first_moment_ceiling(torch.rand(4, 6))
