"""V:N:M activations and training Linear layers on them (nmkit.dynamic.vnm_activations, training.sparse_ffn)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.cli import main
from nmkit.dynamic.vnm_activations import select_vnm
from nmkit.errors import UserError
from nmkit.patterns import VNM
from nmkit.training import SparseTraining
from nmkit.training.masks import magnitude_mask
from nmkit.training.sparse_ffn import VNMActivationLinear, VNMActivationTraining, vnm_linear

PATTERNS = [VNM(8, 2, 8), VNM(4, 3, 8), VNM(16, 1, 4), VNM(5, 2, 16)]


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 40), groups=st.integers(1, 5), which=st.integers(0, len(PATTERNS) - 1),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_selection_satisfies_the_pattern(tokens, groups, which, seed, dtype):
    pattern = PATTERNS[which]
    m = pattern.group
    x = torch.randn(tokens, groups * m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    sel = select_vnm(x, pattern)
    dense = sel.dense(groups * m)
    blocks = -(-tokens // pattern.v)
    assert sel.values.shape == (blocks, pattern.v, groups * 4)
    kept = dense != 0
    assert torch.equal(dense[kept], x[kept])  # kept entries are x's own values
    padded = F.pad(x, (0, 0, 0, blocks * pattern.v - tokens)).reshape(blocks, pattern.v, groups, m)
    cols = torch.zeros(blocks, groups, m, dtype=torch.bool)
    cols.scatter_(2, sel.offsets, True)
    norms = padded.to(torch.promote_types(dtype, torch.float32)).square().sum(1)  # ranked at least in fp32
    for b in range(blocks):
        for g in range(groups):
            c = cols[b, g]
            assert int(c.sum()) == 4  # four columns per V x M block, shared by its tokens
            if m > 4:
                assert norms[b, g][c].min() >= norms[b, g][~c].max()  # the largest-norm ones
    per_token = F.pad(kept, (0, 0, 0, blocks * pattern.v - tokens)).reshape(blocks, pattern.v, groups, m)
    assert not (per_token & ~cols[:, None]).any()  # nothing kept outside the block's columns
    assert int(per_token.sum(-1).max()) <= pattern.keep  # N per token among them
    # Within the four columns each token keeps its N largest magnitudes.
    picked = padded.gather(3, sel.offsets[:, None].expand(blocks, pattern.v, groups, 4)).abs()
    kept4 = per_token.gather(3, sel.offsets[:, None].expand(blocks, pattern.v, groups, 4))
    lo = picked.masked_fill(~kept4, float("inf")).min(-1).values
    hi = picked.masked_fill(kept4, -1.0).max(-1).values
    assert (lo >= hi).all()


@pytest.mark.parametrize("size", [4, 8, 16])
def test_native_top_mask_equals_topk_mask_ties_included(size):
    from nmkit.dynamic.vnm_activations import _top_mask
    from nmkit.solvers.nm import topk_mask

    g = torch.Generator().manual_seed(size)
    scores = torch.randint(0, 4, (300, size), generator=g).float()  # few values: many ties
    for dtype in (torch.float32, torch.bfloat16):
        for k in range(1, size):
            assert torch.equal(_top_mask(scores.to(dtype), k), topk_mask(scores.to(dtype), k)), (dtype, k)


def test_nan_activations_raise_one_clear_line():
    x = torch.randn(8, 16)
    x[3, 5] = float("nan")
    with pytest.raises(UserError, match="activations contain NaN"):
        select_vnm(x, VNM(8, 2, 8))


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("tokens", [1, 13, 40])
@pytest.mark.parametrize("with_mask", [False, True])
def test_vnm_linear_equals_the_dense_reference_and_its_gradients(pattern, tokens, with_mask):
    gen = torch.Generator().manual_seed(tokens)
    features, out = 2 * pattern.group * 2, 7
    x = torch.randn(tokens, features, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, features, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = magnitude_mask(w.detach(), "2:4") if with_mask else None
    y = vnm_linear(x, w, b, pattern, mask)
    ref = F.linear(select_vnm(x, pattern).dense(features), w if mask is None else w * mask, b)
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g), strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_vnm_linear_keeps_leading_dims_and_needs_no_input_gradient():
    x = torch.randn(2, 5, 16)
    w = torch.randn(3, 16, requires_grad=True)
    y = vnm_linear(x, w, None, "4:2:8")
    assert y.shape == (2, 5, 3)
    y.sum().backward()
    assert w.grad is not None and x.grad is None


@pytest.mark.parametrize(("call", "message"), [
    (lambda: vnm_linear(torch.randn(4, 16), torch.randn(3, 16), None, "2:4"), "not V:N:M"),
    (lambda: vnm_linear(torch.randn(4, 12), torch.randn(3, 12), None, "4:2:8"), "not a multiple of M=8"),
    (lambda: vnm_linear(torch.randn(4, 16), torch.randn(3, 16), None, "4:2:8", torch.ones(3, 16)), "bool"),
    (lambda: vnm_linear(torch.randn(4, 16), torch.randn(3, 16), None, "4:2:8",
                        torch.ones(3, 8, dtype=torch.bool)), "weight_mask has shape"),
])
def test_bad_input_raises_one_clear_line(call, message):
    with pytest.raises(UserError, match=message):
        call()


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))


def test_swap_wraps_the_targets_and_remove_puts_them_back():
    model = _mlp()
    originals = {"0": model[0], "2": model[2]}
    swap = VNMActivationTraining(model, "8:2:8", targets=["0", "2"])
    assert isinstance(model[0], VNMActivationLinear) and isinstance(model[2], VNMActivationLinear)
    x = torch.randn(8, 16)
    sel = select_vnm(x, VNM(8, 2, 8))
    assert torch.allclose(model[0](x), F.linear(sel.dense(16), originals["0"].weight, originals["0"].bias))
    back = swap.remove()
    assert back == originals and model[0] is originals["0"] and model[2] is originals["2"]
    with pytest.raises(UserError, match="no nn.Linear"):
        VNMActivationTraining(model, "8:2:8", targets=["nothing.*"])


def test_composes_with_sparse_training_weight_masks():
    """SparseTraining first: the wrapper reads the parametrized (masked) weight, and gradients
    reach the dense parameter through it."""
    model = _mlp()
    sparse = SparseTraining(model, "2:4", method="ste", include=["0", "2"])
    VNMActivationTraining(model, "8:2:8", targets=["0", "2"])
    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    linear = model[0].linear
    weight = linear.parametrizations.weight.original
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    masked = linear.weight
    assert ((masked != 0).reshape(-1, 4).sum(-1) <= 2).all()  # the forward saw a 2:4 weight
    assert sparse.finalize()["valid"]


def test_bench_train_refuses_a_non_vnm_activation_pattern_before_training(capsys):
    assert main(["bench", "train", "--ffn-activations", "none,2:4", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'2:4' is not V:N:M" in err[0]
