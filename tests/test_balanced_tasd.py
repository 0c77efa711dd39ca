"""Balanced (bank), tile-wise and TASD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.pattern_zoo import Balanced, TileWise
from nmkit.patterns import NM, PatternError, parse
from nmkit.solvers import mask_for
from nmkit.solvers.balanced import balanced_mask, tile_wise_mask
from nmkit.solvers.nm import nm_mask, topk_mask
from nmkit.solvers.tasd import tasd_decompose


def test_balanced_parse_and_equivalence_with_nm() -> None:
    assert parse("balanced:32/128") == Balanced(32, 128)
    assert Balanced.from_density(0.25, 128) == Balanced(32, 128)
    w = torch.randn(8, 64)
    # bank sparsity with a small bank is exactly N:M
    assert torch.equal(balanced_mask(w, Balanced(2, 4)), nm_mask(w, "2:4"))
    with pytest.raises(PatternError):
        Balanced(4, 4)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(3, 16), (16, 64), (40, 128), (1, 100)]))
def test_balanced_valid_and_optimal_per_bank(seed: int, kb: tuple[int, int]) -> None:
    k, b = kb
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, b * 3, generator=g)
    p = Balanced(k, b)
    mk = mask_for(w, p)
    assert p.is_valid(mk, exact=True)
    # per bank the kept score is the top-k sum (exact)
    kept = (w * mk).reshape(4, 3, b).sum(-1)
    assert torch.allclose(kept, w.reshape(4, 3, b).topk(k, -1).values.sum(-1), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.1, 0.25, 0.5, 0.8]),
    st.sampled_from([4, 8]),
    st.booleans(),
)
def test_tile_wise_valid_and_within_budget(seed: int, density: float, tile: int, tvw: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 32, generator=g)
    inner = NM(2, 4) if tvw else None
    p = TileWise(tile, density * (0.5 if tvw else 1.0), inner)
    mk = tile_wise_mask(w.abs(), p)
    assert p.is_valid(mk)
    assert int(mk.sum()) <= p.budget(w.numel())
    if not tvw:
        assert p.is_valid(mk, exact=True)
    # never better than row-wise-free unstructured at the same budget
    assert float((w.abs() * mk).sum()) <= float(w.abs().reshape(-1).topk(p.budget(w.numel())).values.sum()) + 1e-4


def test_tile_wise_rejects_ragged_tiles() -> None:
    p = TileWise(2, 0.5)
    mk = torch.zeros(2, 4, dtype=torch.bool)
    mk[0, [0, 1]] = True
    mk[1, [0, 2]] = True  # same tile, different column sets
    assert not p.is_valid(mk, exact=True)
    mk[1] = mk[0]
    assert p.is_valid(mk, exact=True)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([["2:4", "1:4"], ["2:8", "1:8"], ["1:4", "2:8"], ["2:4"]]))
def test_tasd_terms_valid_disjoint_and_monotone(seed: int, terms: list[str]) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 32, generator=g)
    a = a * topk_mask(a.abs().reshape(-1), a.numel() // 4).reshape(a.shape)  # 75% unstructured sparse
    res = tasd_decompose(a, terms)
    assert torch.allclose(res.reconstruct() + res.residual, a)
    for k, p in enumerate(res.patterns):
        padded = res.padded_term(k)  # staggered groups: plain N:M once padded to the group grid
        assert padded.shape[-1] % p.group == 0 and p.is_valid(padded)
        assert torch.allclose(padded.abs().sum(), res.terms[k].abs().sum())
    supports = torch.stack([t != 0 for t in res.terms]).sum(0)
    assert int(supports.max()) <= 1  # disjoint
    errs = res.rel_errors
    assert all(e2 <= e1 + 1e-9 for e1, e2 in zip(errs, errs[1:], strict=False))


def test_tasd_same_group_terms_equal_single_term_and_mixed_groups_beat_small_group() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(128, 128, generator=g)
    a = a * topk_mask(a.abs().reshape(-1), a.numel() // 4).reshape(a.shape)
    two = tasd_decompose(a, ["2:4", "1:4"], offsets=0).rel_errors[-1]
    one = tasd_decompose(a, ["3:4"]).rel_errors[-1]
    assert two == pytest.approx(one)  # aligned disjoint greedy terms: 2:4 + 1:4 == 3:4
    mixed = tasd_decompose(a, ["1:4", "2:8"], offsets=0).rel_errors[-1]  # density 0.5
    assert mixed < tasd_decompose(a, ["2:4"]).rel_errors[-1]
    dense_like = tasd_decompose(a, ["2:4", "2:4"])
    assert dense_like.density == 1.0


def test_tasd_staggered_groups_beat_every_single_term_of_equal_density() -> None:
    """Staggered offsets break the nesting of aligned series (2:4 + 1:4 inside 3:4): two terms beat
    every single N:M term of the same density whose M is at most the series' largest M."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(256, 256, generator=g)
    a = a * topk_mask(a.abs().reshape(-1), a.numel() // 4).reshape(a.shape)

    def err(terms: list[str], **kw) -> float:
        return tasd_decompose(a, terms, **kw).rel_errors[-1]

    res = tasd_decompose(a, ["2:4", "1:4"])
    assert res.offsets == [0, 2] and res.density == 0.75
    assert err(["2:4", "1:4"]) < err(["3:4"])
    assert err(["1:4", "2:8"]) < min(err(["2:4"]), err(["4:8"]), err(["1:2"]))
    assert err(["1:8", "1:8"]) < min(err(["2:8"]), err(["1:4"]))
    assert err(["1:4", "2:8"], offsets=[0, 2]) == err(["1:4", "2:8"])
    with pytest.raises(PatternError):
        tasd_decompose(a, ["1:4", "2:8"], offsets=[0])
