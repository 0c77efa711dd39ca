"""Sparse training: every method deploys valid N:M weights; flip rate; transposable/bidirectional; LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nmkit.patterns import NM
from nmkit.solvers import mask_for
from nmkit.training import (
    Schedule,
    SparseTraining,
    add_sparse_lora,
    bidirectional_linear,
    inherit_family,
    is_subset,
    merge_sparse_lora,
    plot_history,
    soft_threshold,
)

STEPS = 12
STRUCTURE = [("4:8", 0), ("2:8", 4), ("1:8", 8)]  # sparse-structure decay 4:8 -> 2:8 -> 1:8


def _mlp(seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))


def _data(seed: int = 1, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :4] * 2 - x[:, 4:8]).detach()


def _train(model: nn.Module, sparse: SparseTraining, steps: int = STEPS, lr: float = 1e-2) -> list[float]:
    x, y = _data()
    opt = sparse.wrap(torch.optim.AdamW(model.parameters(), lr=lr))
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(loss=loss.item())
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _assert_deployed(model: nn.Module, pattern: str, names=("0", "2", "4")) -> None:
    p = NM.parse(pattern)
    for name, m in model.named_modules():
        if name in names and m.weight.shape[1] % p.group == 0:
            assert not parametrize.is_parametrized(m)
            assert p.is_valid(m.weight), name
            assert isinstance(m.weight, nn.Parameter)


CASES = [
    ("fixed", "2:4", {}),
    ("ste", "2:4", {}),
    ("srste", "2:4", {}),
    ("sste", "2:4", {}),
    ("decay", "1:8", {"schedule": Schedule(total_steps=STEPS)}),
    ("decay", "1:8", {"schedule": Schedule(total_steps=STEPS, decay=None, structure=STRUCTURE)}),
    ("srste", "2:4", {"schedule": Schedule(total_steps=STEPS, dense_finetune=1 / 3, update_interval=2)}),
    ("dense", "2:4", {}),
]


@pytest.mark.parametrize("method,pattern,kw", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_every_method_deploys_valid_nm(method, pattern, kw):
    model = _mlp()
    sparse = SparseTraining(model, pattern, method=method, **kw)
    losses = _train(model, sparse)
    assert all(torch.isfinite(torch.tensor(losses)))
    report = sparse.finalize()
    assert report["valid"] and report["pattern"] == pattern
    _assert_deployed(model, pattern)


def test_fixed_mask_never_changes_and_matches_forward():
    model = _mlp()
    with torch.no_grad():  # a "one-shot pruned" model: zero 2 of every 4 by magnitude
        for m in model:
            if isinstance(m, nn.Linear) and m.in_features % 4 == 0:
                m.weight.mul_(mask_for(m.weight.abs(), NM(2, 4)))
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sparse = SparseTraining(model, "2:4", method="fixed", masks="nonzero")
    _train(model, sparse, steps=8)
    sparse.finalize()
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert bool((m.weight[zeros[n]] == 0).all()), n


def test_deployed_forward_equals_training_forward_for_sste():
    model = _mlp()
    sparse = SparseTraining(model, "2:4", method="sste")
    _train(model, sparse, steps=4)
    x, _ = _data()
    with torch.no_grad():
        before = model(x)
    sparse.finalize()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_flip_rate_hand_made_case():
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[4.0, 3, 2, 1, 1, 2, 3, 4], [1, 2, 3, 4, 4, 3, 2, 1]]))
    model = nn.Sequential(lin)
    sparse = SparseTraining(model, "2:4", method="ste")
    w = lin.parametrizations.weight.original
    with torch.no_grad():  # row 0, first group: make index 3 beat index 1 -> 2 flips of 16 weights
        w[0, 3] = 10.0
    rates = sparse.update_masks()
    assert rates["0"] == pytest.approx(2 / 16) and rates["overall"] == pytest.approx(2 / 16)
    assert sparse.flip_rate()["overall"] == pytest.approx(2 / 16)
    assert sparse.update_masks()["overall"] == 0.0
    assert sparse.history.flip_rate == [pytest.approx(2 / 16), 0.0]


def test_flip_rate_overall_weights_layers_by_size():
    model = nn.Sequential(nn.Linear(8, 4, bias=False), nn.Linear(8, 1, bias=False))
    sparse = SparseTraining(model, "2:4", method="ste")
    with torch.no_grad():
        w = model[0].parametrizations.weight.original
        w[0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        w[1, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
        sparse.update_masks()
        w[0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # 4 flips in layer 0 (32 weights), none in layer 1 (8)
    rates = sparse.update_masks()
    assert rates["0"] == pytest.approx(4 / 32) and rates["1"] == 0.0
    assert rates["overall"] == pytest.approx(4 / 40)


def test_masked_decay_shrinks_pruned_weights_only():
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    sparse = SparseTraining(model, "2:4", method="srste", masked_decay=0.5)
    w = model[0].parametrizations.weight.original
    w.grad = torch.zeros_like(w)
    sparse.before_optimizer_step()
    mask = model[0].parametrizations.weight[0].mask
    torch.testing.assert_close(w.grad, 0.5 * w.detach() * ~mask)


def test_soft_threshold_keeps_at_most_n_and_is_continuous():
    x = torch.randn(64, 64)
    for spec in ("2:4", "1:4", "2:8"):
        p = NM.parse(spec)
        assert p.is_valid(soft_threshold(x, p))
    a = torch.tensor([[0.5, 0.3, 1.0, 2.0]])
    b = a.clone()
    b[0, 1] = 0.5001  # crosses the threshold: output may change by ~1e-4 only
    assert (soft_threshold(a, NM(2, 4)) - soft_threshold(b, NM(2, 4))).abs().max() < 1e-3


@pytest.mark.parametrize("pattern", ["2:4", "1:8"])
def test_transposable_training_deploys_valid_w_and_wt(pattern):
    p = NM.parse(pattern)
    model = _mlp()
    sparse = SparseTraining(model, pattern, method="srste", mask_kind="transposable", exclude=("4",))
    for layer in sparse.layers:
        assert p.is_valid(layer.param.mask) and p.is_valid(layer.param.mask.T)
    _train(model, sparse)
    report = sparse.finalize()
    assert report["valid"]
    for i in (0, 2):
        w = model[i].weight
        assert p.is_valid(w) and p.is_valid(w.T)


def test_bidirectional_function_uses_backward_mask():
    torch.manual_seed(0)
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    bmask = mask_for(w.detach().abs().T, NM(2, 4)).T
    y = bidirectional_linear(x, w, None, bmask)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(y, x @ w.T)
    torch.testing.assert_close(x.grad, g @ (w.detach() * bmask))
    torch.testing.assert_close(w.grad, g.T @ x.detach())


def test_bidirectional_training_masks_valid_for_w_and_wt():
    model = _mlp()
    sparse = SparseTraining(model, "2:4", method="srste", mask_kind="bidirectional", exclude=("4",))
    assert type(model[0]).__name__ == "BidirectionalLinear"
    for layer in sparse.layers:
        fwd, bwd = layer.param.mask, layer.param.backward_mask
        assert NM(2, 4).is_valid(fwd) and NM(2, 4).is_valid(bwd.T)
        assert bool((bwd <= fwd).all())  # Bi-Mask: backward keeps a subset of the forward mask
    _train(model, sparse)
    report = sparse.finalize()
    assert report["valid"] and isinstance(model[0], nn.Linear)


def test_lora_merge_keeps_exact_nm():
    model = _mlp()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear) and m.in_features % 4 == 0:
                m.weight.mul_(mask_for(m.weight.abs(), NM(2, 4)))
    before = {i: (model[i].weight != 0).clone() for i in (0, 2)}
    names = add_sparse_lora(model, rank=4, alpha=8, exclude=("4",))
    assert names == ["0", "2"]
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(trainable, lr=5e-2)
    x, y = _data()
    for _ in range(10):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert model[0].parametrizations.weight[0].lora_B.abs().sum() > 0  # the adapter did learn
    merge_sparse_lora(model)
    for i in (0, 2):
        w = model[i].weight
        assert NM(2, 4).is_valid(w)
        assert bool(((w != 0) <= before[i]).all())  # no new non-zeros


def test_inheritance_child_mask_subset_of_parent():
    def train(m, sparse):
        _train(m, sparse, steps=6)

    family = inherit_family(_mlp(), ["4:8", "2:8", "1:8"], train, exclude=("4",))
    assert list(family) == ["4:8", "2:8", "1:8"]
    for parent, child in (("4:8", "2:8"), ("2:8", "1:8")):
        for i in (0, 2):
            assert NM.parse(child).is_valid(family[child][i].weight)
            assert is_subset(family[child][i].weight, family[parent][i].weight)


def test_plot_history_writes_png(tmp_path):
    model = _mlp()
    sparse = SparseTraining(model, "2:4", method="ste")
    _train(model, sparse, steps=5)
    path = plot_history({"ste": sparse.history}, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_matches_eager():
    results = []
    for compiled in (False, True):
        model = _mlp()
        sparse = SparseTraining(model, "2:4", method="srste")
        run = torch.compile(model, backend="aot_eager") if compiled else model
        x, y = _data()
        opt = sparse.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2))
        for _ in range(4):
            nn.functional.mse_loss(run(x), y).backward()
            opt.step()
            opt.zero_grad()
        sparse.finalize()
        results.append([m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_inputs_are_user_errors():
    from nmkit.errors import UserError

    with pytest.raises(UserError):
        SparseTraining(_mlp(), "2:4", method="magic")
    with pytest.raises(UserError):
        SparseTraining(_mlp(), "2:4", method="decay")  # needs total_steps
    with pytest.raises(UserError):
        SparseTraining(_mlp(), "2:4", include=["nothing*"])
    sparse = SparseTraining(_mlp(), "2:4")
    sparse.finalize()
    with pytest.raises(UserError):
        sparse.step()


def test_dense_phase_starts_from_the_sparse_point():
    model = _mlp()
    sparse = SparseTraining(model, "2:4", method="srste", schedule=Schedule(total_steps=6, dense_finetune=0.5))
    _train(model, sparse, steps=2)
    assert not sparse.in_dense_phase
    w = model[2].parametrizations.weight.original
    mask = model[2].parametrizations.weight[0].mask.clone()
    sparse.step()  # step 3 = 6 - 3: the dense phase begins, pruned master weights are zeroed
    assert sparse.in_dense_phase and bool((w[~mask] == 0).all())
    torch.testing.assert_close(model[2].weight, w)  # forward is now dense
    report = sparse.finalize(keep_dense=True)
    assert report["dense"]


def test_update_interval_and_resume_state():
    model = _mlp()
    sparse = SparseTraining(model, "2:4", method="ste", schedule=Schedule(update_interval=3))
    _train(model, sparse, steps=7)
    assert sparse.history.flip_steps == [3, 6]
    state = sparse.state_dict()
    other = SparseTraining(_mlp(), "2:4", method="ste", schedule=Schedule(update_interval=3))
    other.load_state_dict(state)
    assert other.steps == 7 and other.history.flip_steps == [3, 6]


@pytest.mark.slow
def test_compile_inductor_trains_and_deploys():
    model = _mlp()
    sparse = SparseTraining(model, "2:4", method="sste")
    run = torch.compile(model)
    x, y = _data()
    opt = sparse.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for _ in range(3):
        nn.functional.mse_loss(run(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert sparse.finalize()["valid"]
