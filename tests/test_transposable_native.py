"""Compiled transposable N:M solver (csrc/nmkit_solvers.c): validity, exactness, torch parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.pattern_zoo import Transposable
from nmkit.solvers import native
from nmkit.solvers.transposable import (
    _exact_lp,
    _two_swap,
    from_tiles,
    tile_score,
    to_tiles,
    transposable_mask,
)

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled solvers not built")

NMS = [(1, 4), (2, 4), (3, 4), (1, 8), (3, 8), (4, 8), (5, 16), (8, 16), (16, 32), (2, 3)]


def _scores(seed: int, rows: int, cols: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if kind == "abs":
        return w.abs()
    if kind == "ties":
        return (w.abs() * 2).round()  # many equal scores, zeros included
    return w  # negative scores too: the solver must still keep exactly N


def _per_tile(scores: torch.Tensor, mask: torch.Tensor, m: int) -> np.ndarray:
    return (to_tiles(scores.double(), m) * to_tiles(mask, m)).sum((-2, -1)).numpy()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(NMS),
    st.integers(1, 3),
    st.integers(1, 3),
    st.sampled_from(["abs", "ties", "signed"]),
)
def test_every_tile_valid(seed: int, nm: tuple[int, int], tr: int, tc: int, kind: str) -> None:
    n, m = nm
    w = _scores(seed, m * tr, m * tc, kind)
    pat = Transposable(n, m)
    for mode in ("greedy", "swap", "optimal"):
        mk = native.transposable(w, n, m, mode)
        assert mk.dtype == torch.bool and mk.shape == w.shape
        assert pat.is_valid(mk), mode
        if mode != "greedy":
            assert pat.is_valid(mk, exact=True), mode


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(NMS), st.sampled_from(["abs", "ties", "signed"]))
def test_optimal_equals_lp_per_tile(seed: int, nm: tuple[int, int], kind: str) -> None:
    n, m = nm
    w = _scores(seed, 2 * m, 2 * m, kind)  # float32: the LP sees the same numbers as the C solver
    mk = native.transposable(w, n, m, "optimal")
    lp = from_tiles(_exact_lp(to_tiles(w, m), n, m), w.shape, m)
    got, opt = _per_tile(w, mk, m), _per_tile(w, lp, m)
    scale = float(w.abs().max()) * n * m
    np.testing.assert_allclose(got, opt, rtol=0, atol=1e-5 * max(scale, 1.0))
    # and it sits at or above every other method that keeps exactly N
    for method in ("fast", "entropic"):
        other = transposable_mask(w, f"{n}:{m}", method)
        assert (got >= _per_tile(w, other, m) - 1e-5 * max(scale, 1.0)).all(), method


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(NMS), st.booleans())
def test_greedy_matches_torch_reference(seed: int, nm: tuple[int, int], ties: bool) -> None:
    n, m = nm
    w = _scores(seed, 3 * m, 2 * m, "ties" if ties else "abs")
    torch_greedy = transposable_mask(w, f"{n}:{m}", "greedy", native=False)
    assert torch.equal(native.transposable(w, n, m, "greedy"), torch_greedy)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, 4), (4, 8), (8, 16), (16, 32)]))
def test_swap_is_two_swap_optimal_and_beats_greedy(seed: int, nm: tuple[int, int]) -> None:
    n, m = nm
    w = _scores(seed, 4 * m, 4 * m, "abs")
    mk = native.transposable(w, n, m, "swap")
    tiles, mt = to_tiles(w, m), to_tiles(mk, m).clone()
    before = tile_score(tiles, mt)
    assert tile_score(tiles, _two_swap(mt, tiles, rounds=5)) <= before + 1e-4  # no improving 2x2 swap left
    greedy = tile_score(w, native.transposable(w, n, m, "greedy"))
    opt = tile_score(w, native.transposable(w, n, m, "optimal"))
    assert greedy <= before <= opt + 1e-3


def test_exact_n_can_sit_below_the_at_most_n_greedy() -> None:
    """Why "never below greedy" is checked on random matrices, not per tile: greedy keeps <= N and can
    hold a set that no exactly-N mask contains (3x3 tile, N=2: the optimum keeps 3.5, greedy 4.5)."""
    tile = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    assert tile_score(tile, native.transposable(tile, 2, 3, "optimal")) == pytest.approx(3.5)
    assert tile_score(tile, native.transposable(tile, 2, 3, "greedy")) == pytest.approx(4.5)


def test_auto_uses_native_and_batch_dims() -> None:
    w = torch.rand(3, 32, 48)
    mk = transposable_mask(w, "4:8")
    assert mk.shape == w.shape and Transposable(4, 8).is_valid(mk, exact=True)
    for i in range(3):
        assert torch.equal(mk[i], native.transposable(w[i], 4, 8, "optimal"))
    # float64 and integer scores go through float32; the result is still a valid optimum
    assert torch.equal(transposable_mask(w.double(), "4:8", "optimal"), mk)
    assert Transposable(2, 4).is_valid(transposable_mask(torch.randint(0, 9, (8, 8)), "2:4T"), exact=True)


def test_threads_do_not_change_the_mask() -> None:
    w = torch.rand(128, 128)
    one = native.transposable(w, 8, 16, "optimal", threads=1)
    assert torch.equal(one, native.transposable(w, 8, 16, "optimal", threads=2))


def test_fallback_without_library(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.rand(16, 16)
    ref = transposable_mask(w, "4:8", "optimal")
    monkeypatch.setattr(native, "_lib", lambda: None)
    assert not native.available()
    lp = transposable_mask(w, "4:8", "optimal")  # the LP path gives the same optimum
    assert tile_score(w, lp) == pytest.approx(tile_score(w, ref), rel=1e-6)
    assert Transposable(4, 8).is_valid(transposable_mask(w, "4:8", "fast"), exact=True)


# --- compiled stripe-pair permutation search ------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, 4), (1, 4), (3, 4), (1, 2), (1, 3)]))
def test_stripe_pairs_two_stripes_is_the_exhaustive_optimum(seed: int, nm: tuple[int, int]) -> None:
    import itertools

    from nmkit.solvers.permutation import kept_by_nm

    n, m = nm
    w = torch.rand(64, 2 * m, generator=torch.Generator().manual_seed(seed))
    xt, perm = w.T.contiguous(), torch.arange(2 * m)
    native.stripe_pairs(xt, perm, n, m, seconds=10.0)
    assert sorted(perm.tolist()) == list(range(2 * m)) and torch.equal(xt.T, w[:, perm])
    best = max(
        kept_by_nm(w[:, list(g) + [j for j in range(2 * m) if j not in g]], f"{n}:{m}")
        for g in itertools.combinations(range(2 * m), m)
    )
    assert kept_by_nm(xt.T, f"{n}:{m}") == pytest.approx(best, rel=1e-6)


def test_stripe_pairs_deterministic_across_threads_and_improves() -> None:
    from nmkit.solvers.permutation import kept_by_nm, permute_channels

    w = torch.rand(256, 128, generator=torch.Generator().manual_seed(3))
    runs = []
    for threads in (1, 2):
        xt, perm = w.T.contiguous(), torch.arange(128)
        native.stripe_pairs(xt, perm, 2, 4, seconds=60.0, seed=7, threads=threads)  # runs until it stalls
        runs.append(perm)
    assert torch.equal(runs[0], runs[1])
    assert kept_by_nm(w[:, runs[0]], "2:4") > kept_by_nm(w, "2:4")
    r = permute_channels(w, "2:4", method="random_pairs", time_budget_s=0.5)
    assert r.method.startswith("random_pairs[C]") and r.kept > r.kept_default
    assert sorted(r.perm.tolist()) == list(range(128))
    assert r.kept == pytest.approx(kept_by_nm(w[:, r.perm], "2:4"), rel=1e-6)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(2, 4), (1, 4), (1, 2), (2, 3)]), st.sampled_from([2, 3]))
def test_stripe_converge_leaves_no_improving_group(seed: int, nm: tuple[int, int], k: int) -> None:
    import itertools

    from nmkit.solvers.permutation import _group_gains, kept_by_nm

    n, m = nm
    cols = m * 6
    w = torch.rand(48, cols, generator=torch.Generator().manual_seed(seed))
    xt, perm = w.T.contiguous(), torch.arange(cols)
    before = kept_by_nm(w, f"{n}:{m}")
    native.stripe_converge(xt, perm, n, m, k, seconds=30.0)
    assert sorted(perm.tolist()) == list(range(cols)) and torch.equal(xt.T, w[:, perm])
    after = kept_by_nm(xt.T, f"{n}:{m}")
    assert after >= before - 1e-6
    groups = torch.tensor(list(itertools.combinations(range(6), k)))
    gains, _ = _group_gains(xt, groups, n, m, k)
    assert float(gains.max()) <= 1e-5 * after  # converged: no k-stripe move gains


def test_apex_matrix_reaches_apex_quality_fast() -> None:
    """apex's permutation test matrix: 37.02% after pairs -> triples -> pairs (apex w=12: 36.6%), and
    the escapes go beyond it within the issue's 1 s budget."""
    from nmkit.solvers.permutation import permute_channels

    w = torch.from_numpy(np.random.RandomState(1).rand(128, 64))  # == np.random.seed(1); rand(128, 64)
    r = permute_channels(w, "2:4", time_budget_s=1.0)
    assert r.method.startswith("triples[C]")
    assert r.efficacy >= 0.37
    r0 = permute_channels(w, "2:4", time_budget_s=30.0, max_escapes=0)
    assert r0.efficacy == pytest.approx(0.3702, abs=5e-4)


def test_permutation_torch_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    from nmkit.solvers import permutation

    monkeypatch.setattr(permutation, "_native_ok", lambda: False)
    w = torch.rand(32, 64, generator=torch.Generator().manual_seed(0))
    r = permutation.permute_channels(w, "2:4", time_budget_s=0.3)
    assert r.method.startswith("triples+") and r.kept >= r.kept_default
    r = permutation.permute_channels(w, "2:4", method="random_pairs", time_budget_s=0.3)
    assert r.method == "random_pairs" and r.kept >= r.kept_default
