"""Transposable N:M: validity, exactness against the LP, approximation bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.pattern_zoo import Transposable
from nmkit.patterns import NM, PatternError
from nmkit.solvers import mask_for
from nmkit.solvers.transposable import (
    _exact_lp,
    _two_swap,
    from_tiles,
    tile_patterns,
    tile_score,
    to_tiles,
    transposable_mask,
)


def _brute_force_tile(tile: np.ndarray, n: int) -> float:
    m = tile.shape[0]
    best = -np.inf
    rows = list(itertools.combinations(range(m), n))
    for choice in itertools.product(rows, repeat=m):
        cols = np.zeros(m, dtype=int)
        for r in choice:
            cols[list(r)] += 1
        if (cols == n).all():
            best = max(best, sum(tile[i, list(r)].sum() for i, r in enumerate(choice)))
    return best


def test_pattern_counts_match_known_values() -> None:
    assert tile_patterns(2, 4).shape == (90, 16)
    assert tile_patterns(1, 4).shape == (24, 16)
    assert tile_patterns(1, 2).shape == (2, 4)


def test_str_and_validation() -> None:
    p = Transposable(2, 4)
    assert str(p) == "2:4T" and p.density == 0.5
    eye = torch.zeros(4, 4, dtype=torch.bool)
    eye[[0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 2, 3, 2, 3]] = True
    assert p.is_valid(eye, exact=True)
    bad = eye.clone()
    bad[:, 0] = True  # column 0 keeps 4
    assert not p.is_valid(bad)
    assert NM(2, 4).is_valid(eye) and not p.is_valid(torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(PatternError):
        transposable_mask(torch.rand(4, 6), "2:4")


def test_tiles_roundtrip() -> None:
    x = torch.arange(2 * 8 * 12).reshape(2, 8, 12)
    t = to_tiles(x, 4)
    assert t.shape == (12, 4, 4)
    assert torch.equal(t[1], x[0, :4, 4:8])
    assert torch.equal(from_tiles(t, x.shape, 4), x)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(1, 4), (2, 4), (3, 4)]))
def test_exact_m4_equals_brute_force_and_lp(seed: int, nm: tuple[int, int]) -> None:
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 8, generator=g, dtype=torch.float64)
    mask = transposable_mask(w, f"{n}:{m}", "exact")
    assert Transposable(n, m).is_valid(mask, exact=True)
    lp = from_tiles(_exact_lp(to_tiles(w, m), n, m), w.shape, m)
    assert tile_score(w, mask) == pytest.approx(tile_score(w, lp), abs=1e-9)
    tiles = to_tiles(w, m)
    brute = sum(_brute_force_tile(t.numpy(), n) for t in tiles)
    assert tile_score(w, mask) == pytest.approx(brute, abs=1e-9)


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([(2, 4), (1, 8), (4, 8), (3, 8), (8, 16)]),
    st.integers(1, 3),
    st.booleans(),
)
def test_every_method_valid_and_bounded_by_exact(
    seed: int, nm: tuple[int, int], tiles: int, ties: bool
) -> None:
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m * tiles, m * 2, generator=g).abs()
    if ties:
        w = (w * 2).round()  # many equal scores
    pat = Transposable(n, m)
    exact = transposable_mask(w, pat, "exact")
    assert pat.is_valid(exact, exact=True)
    opt = tile_score(w, exact)
    for method in ("greedy", "fast", "entropic", "auto"):
        mk = transposable_mask(w, pat, method)
        assert mk.dtype == torch.bool and mk.shape == w.shape
        assert pat.is_valid(mk), method
        got = tile_score(w, mk)
        if method != "greedy":  # greedy keeps at most N, which can score above the exactly-N optimum
            assert pat.is_valid(mk, exact=True), method
            assert got <= opt + 1e-4 * max(1.0, opt), method
        # greedy is a 1/2-approximation of the kept score for non-negative scores
        assert got >= 0.5 * opt - 1e-6, method
    # deterministic: same input, same mask
    assert torch.equal(transposable_mask(w, pat, "entropic"), transposable_mask(w, pat, "entropic"))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_entropic_is_two_swap_locally_optimal(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 16, generator=g).abs()
    mk = transposable_mask(w, "4:8", "entropic")
    tiles, mt = to_tiles(w, 8), to_tiles(mk, 8).clone()
    before = tile_score(tiles, mt)
    after = tile_score(tiles, _two_swap(mt, tiles, rounds=5))
    assert after <= before + 1e-5


def test_entropic_close_to_exact_on_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g).abs()
    for n, m in [(4, 8), (8, 16)]:
        opt = tile_score(w, transposable_mask(w, f"{n}:{m}", "exact"))
        total = float(w.double().sum())
        ent = tile_score(w, transposable_mask(w, f"{n}:{m}", "entropic"))
        gr = tile_score(w, transposable_mask(w, f"{n}:{m}", "greedy"))
        assert (opt - ent) / (total - opt) <= 0.005
        assert ent >= gr


def test_batch_dims_and_project() -> None:
    w = torch.rand(3, 8, 8)
    pat = Transposable(2, 4)
    mk = mask_for(w, pat)
    assert mk.shape == w.shape and pat.is_valid(mk, exact=True)
    for i in range(3):
        assert torch.equal(mk[i], transposable_mask(w[i], pat))
