"""Property tests for the row-wise N:M solver against a brute-force reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.patterns import NM, PatternError, Unstructured
from nmkit.solvers import mask_for, nm_mask, topk_mask

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32]


@st.composite
def nm_patterns(draw, max_group=64):
    m = draw(st.sampled_from([2, 3, 4, 5, 8, 16, 32, 64]).filter(lambda x: x <= max_group))
    return NM(draw(st.integers(1, m - 1)), m)


@st.composite
def score_tensors(draw, pattern):
    """Scores whose size along a random dim is a multiple of M; few distinct values force ties."""
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    shape[dim] = pattern.group * draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    distinct = draw(st.sampled_from([2, 3, 1000]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-distinct, distinct, shape, generator=g)
    return values.to(dtype), dim


def reference_mask(scores: torch.Tensor, pattern: NM, dim: int) -> torch.Tensor:
    """Brute force: per group, sort by (-score, index) and keep the first N."""
    s = scores.movedim(dim, -1).double()
    flat = s.reshape(-1, pattern.group)
    out = torch.zeros(flat.shape, dtype=torch.bool)
    for r in range(flat.shape[0]):
        order = sorted(range(pattern.group), key=lambda i: (-flat[r, i].item(), i))
        out[r, order[: pattern.keep]] = True
    return out.reshape(s.shape).movedim(-1, dim)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_matches_brute_force_with_index_tie_break(data):
    pattern = data.draw(nm_patterns())
    scores, dim = data.draw(score_tensors(pattern))
    mask = nm_mask(scores, pattern, dim=dim)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, reference_mask(scores, pattern, dim))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_each_group_keeps_exactly_n_and_a_top_n_set(data):
    pattern = data.draw(nm_patterns())
    scores, dim = data.draw(score_tensors(pattern))
    mask = nm_mask(scores, pattern, dim=dim)
    assert pattern.is_valid(mask, dim=dim, exact=True)
    s = scores.movedim(dim, -1).double().reshape(-1, pattern.group)
    m = mask.movedim(dim, -1).reshape(-1, pattern.group)
    kept_min = torch.where(m, s, torch.full_like(s, float("inf"))).amin(-1)
    pruned_max = torch.where(~m, s, torch.full_like(s, float("-inf"))).amax(-1)
    assert bool((kept_min >= pruned_max).all())


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_deterministic_and_dim_consistent(data):
    pattern = data.draw(nm_patterns(max_group=16))
    scores, dim = data.draw(score_tensors(pattern))
    a = nm_mask(scores, pattern, dim=dim)
    b = nm_mask(scores.clone(), pattern, dim=dim)
    assert torch.equal(a, b)
    # Solving along dim equals solving the transposed layout along the last dim.
    c = nm_mask(scores.movedim(dim, -1).contiguous(), pattern, dim=-1).movedim(-1, dim)
    assert torch.equal(a, c)


def test_large_groups_use_sort_path_and_agree():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (7, 128), generator=g).float()
    for pattern in (NM(16, 32), NM(5, 64)):
        assert torch.equal(nm_mask(scores, pattern), reference_mask(scores, pattern, -1))


def test_tail_policies():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 9.0, 8.0, 7.0]])
    with pytest.raises(PatternError, match="not divisible"):
        nm_mask(scores, "2:4")
    pad = nm_mask(scores, "2:4", tail="pad")
    assert pad.tolist() == [[True, True, False, False, True, True, False]]
    dense = nm_mask(scores, "2:4", tail="dense")
    assert dense.tolist() == [[True, True, False, False, True, True, True]]
    with pytest.raises(PatternError, match="tail must be"):
        nm_mask(scores, "2:4", tail="drop")


def test_nan_scores_rejected():
    with pytest.raises(PatternError, match="NaN"):
        nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), "2:4")


def test_negative_zero_ties_with_zero():
    # -0.0 == 0.0: the tie goes to the lower index, whatever the sign bit.
    scores = torch.tensor([[-0.0, 0.0, 0.0, -0.0]])
    assert nm_mask(scores, "1:4").tolist() == [[True, False, False, False]]


def test_unstructured_and_dense_via_mask_for():
    scores = torch.arange(10.0).reshape(2, 5)
    m = mask_for(scores, "40%")
    assert m.tolist() == [[False, False, True, True, True]] * 2
    assert Unstructured(0.4).is_valid(m, exact=True)
    assert mask_for(scores, "dense").all()
    assert topk_mask(torch.ones(3, 70), 10).sum(-1).tolist() == [10, 10, 10]
    assert torch.equal(topk_mask(torch.ones(1, 70), 10)[0, :10], torch.ones(10, dtype=torch.bool))
