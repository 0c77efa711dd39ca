"""Input permutations during N:M training (``SparseTraining(permute=...)``): the exported model computes
what was trained, every weight is plain N:M in its stored order, and the state resumes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.permute_model import PermutedInput
from nmkit.training import Schedule, SparseTraining
from nmkit.training.masks import magnitude_mask
from nmkit.training.permutation import PermuteConfig, hard_assignment, l1_l2_penalty, sinkhorn
from nmkit.training.tinygpt import TinyGPT

STEPS = 12


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(40, 16, 1, 2, 8).double()


def _batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 40, (4, 9), generator=g) for _ in range(n)]


def _sparse(model: nn.Module, permute: str = "learned", producers: bool = True, **cfg) -> SparseTraining:
    prod = {"blocks.0.out": ["blocks.0.fc"]} if producers else {}
    return SparseTraining(
        model,
        "2:4",
        method="sste",
        include=["blocks.*"],
        schedule=Schedule(total_steps=STEPS),
        permute=permute,
        permute_config=PermuteConfig(producers=prod, **cfg),
    )


def _optimizer(model: nn.Module, sparse: SparseTraining) -> torch.optim.Optimizer:
    logits = {id(p) for p in sparse.permutation_parameters()}
    rest = [p for p in model.parameters() if id(p) not in logits]
    groups = [{"params": rest}]
    if logits:
        groups.append({"params": sparse.permutation_parameters(), "lr": 0.3, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=1e-2)


def _train(model, sparse, opt, batches) -> None:
    for b in batches:
        loss = model.loss(b)
        (loss + sparse.permutation_penalty()).backward()  # zero unless permute="padst"
        opt.step()
        opt.zero_grad()
        sparse.step(loss.item())


def _scramble_logits(sparse: SparseTraining) -> None:
    """Random logits far from the identity, so hardening certainly moves channels (tests the plumbing)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in sparse.permuted.values():
            w.logits.copy_(torch.randn(w.logits.shape, generator=g, dtype=w.logits.dtype) * 20)


@pytest.mark.parametrize(
    ("producers", "mode"), [(False, "learned"), (True, "learned"), (False, "padst"), (True, "padst")]
)
def test_exported_model_equals_trained_function(producers, mode):
    model = _model()
    sparse = _sparse(model, permute=mode, producers=producers)
    opt = _optimizer(model, sparse)
    if mode == "learned":  # padst starts random by itself
        _scramble_logits(sparse)
    _train(model, sparse, opt, _batches())
    x = _batches(1)[0][:, :-1]
    with torch.no_grad():
        trained = model(x)
    report = sparse.finalize()
    with torch.no_grad():
        exported = model(x)
    kinds = report["permute"]["layers"]
    assert kinds["blocks.0.out"] == ("absorbed" if producers else "runtime")
    assert kinds["blocks.0.qkv"] == "runtime" and report["permute"]["hardened_at_finalize"] == []
    if producers:  # the producer's rows were permuted: the same products, summed in the same order
        torch.testing.assert_close(exported, trained, rtol=0, atol=1e-12)
    else:  # PermutedInput runs exactly the trained hard-permutation forward
        assert torch.equal(exported, trained)
    block = model.blocks[0]
    assert isinstance(block.qkv, PermutedInput) and isinstance(block.fc, PermutedInput)
    assert isinstance(block.out, nn.Linear) == producers
    for mod in (block.qkv, block.proj, block.fc, block.out):  # plain N:M in the stored order
        w = mod.weight
        assert not hasattr(getattr(mod, "inner", mod), "parametrizations") and NM.parse("2:4").is_valid(w)
        assert float((w != 0).double().mean()) <= 0.5


def test_hardened_permutation_is_valid_and_moves_channels():
    model = _model()
    sparse = _sparse(model)
    opt = _optimizer(model, sparse)
    _scramble_logits(sparse)
    _train(model, sparse, opt, _batches(STEPS // 2))  # harden_at 0.5: hard from step 6
    for w in sparse.permuted.values():
        assert bool(w.hardened) and not w.logits.requires_grad
        assert torch.equal(torch.sort(w.perm).values, torch.arange(len(w.perm)))
        # block-diagonal: every input stays in its window
        assert torch.equal(w.perm // w.block, torch.arange(len(w.perm)) // w.block)
    assert any(not torch.equal(w.perm, torch.arange(len(w.perm))) for w in sparse.permuted.values())


def test_soft_phase_learns_logits_and_anneals():
    model = _model()
    sparse = _sparse(model, harden_at=1.0)
    opt = _optimizer(model, sparse)
    taus = []
    for b in _batches(4):
        loss = model.loss(b)
        loss.backward()
        assert all(w.logits.grad is not None and w.logits.grad.abs().sum() > 0 for w in sparse.permuted.values())
        opt.step()
        opt.zero_grad()
        sparse.step(loss.item())
        taus.append(float(next(iter(sparse.permuted.values())).tau))
    assert all(a > b for a, b in itertools.pairwise(taus))
    p = next(iter(sparse.permuted.values())).soft()
    ones = torch.ones(p.shape[:-1], dtype=p.dtype)
    torch.testing.assert_close(p.sum(-2), ones)  # the last Sinkhorn round normalises columns
    torch.testing.assert_close(p.sum(-1), ones, rtol=0, atol=1e-2)  # rows: close after 20 rounds
    report = sparse.finalize()  # never hardened during training: finalize hardens and says so
    assert len(report["permute"]["hardened_at_finalize"]) == 4


def test_an_unmoved_permutation_exports_a_plain_linear():
    model = _model()
    sparse = _sparse(model, harden_at=1.0)
    report = sparse.finalize()  # the logits never trained: the nearest permutation is the identity
    assert set(report["permute"]["layers"].values()) == {"identity"}
    assert all(type(m) is nn.Linear for m in model.blocks[0].children() if hasattr(m, "weight") and m.weight.dim() == 2)


@pytest.mark.parametrize("mode", ["learned", "padst"])
def test_deterministic_for_a_seed(mode):
    runs = []
    for _ in range(2):
        model = _model()
        sparse = _sparse(model, permute=mode)
        _train(model, sparse, _optimizer(model, sparse), _batches())
        sparse.finalize()
        runs.append(model.state_dict())
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_state_dict_round_trip_resumes_exactly():
    batches = _batches()
    model = _model()
    sparse = _sparse(model)
    opt = _optimizer(model, sparse)
    _train(model, sparse, opt, batches[:4])  # still soft
    saved = copy.deepcopy((model.state_dict(), sparse.state_dict(), opt.state_dict()))  # tensors are live
    _train(model, sparse, opt, batches[4:])

    fresh = _model()
    resumed = _sparse(fresh)
    opt2 = _optimizer(fresh, resumed)
    fresh.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    assert resumed.steps == 4 and not any(bool(w.hardened) for w in resumed.permuted.values())
    _train(fresh, resumed, opt2, batches[4:])
    for name, w in sparse.permuted.items():
        assert torch.equal(resumed.permuted[name].perm, w.perm)
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="permute='learned'"):
        _sparse(_model(), permute="oneshot").load_state_dict(saved[1])


def test_oneshot_keeps_more_magnitude_and_exports_exactly():
    model = _model()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.startswith("blocks.0.")}
    sparse = _sparse(model, permute="oneshot", producers=False)
    assert sparse.permutation_parameters() == []
    p = NM.parse("2:4")
    for name, w in sparse.permuted.items():
        assert bool(w.hardened)
        # the stored weight is the original in the searched order: the function starts unchanged
        assert torch.equal(w.inner.parametrizations.weight.original, dense[name][:, w.perm])
        stored = w.inner.parametrizations.weight.original.detach()
        kept = float((stored.abs() * magnitude_mask(stored, p)).sum())
        assert kept >= float((dense[name].abs() * magnitude_mask(dense[name], p)).sum()) * (1 - 1e-6)
    _train(model, sparse, _optimizer(model, sparse), _batches(4))
    x = _batches(1)[0][:, :-1]
    with torch.no_grad():
        trained = model(x)
    sparse.finalize()
    with torch.no_grad():
        assert torch.equal(model(x), trained)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_llama_mlp_down_proj_is_absorbed_without_a_producers_map():
    torch.manual_seed(0)
    model = nn.Sequential(_MLP()).double()
    sparse = SparseTraining(
        model, "1:4", method="ste", include=["*down_proj"], schedule=Schedule(total_steps=2), permute="learned"
    )
    _scramble_logits(sparse)
    x = torch.randn(5, 8, dtype=torch.float64)
    for _ in range(2):
        model(x).square().mean().backward()
        sparse.step()
    with torch.no_grad():
        trained = model(x)
    report = sparse.finalize()
    assert report["permute"]["layers"] == {"0.down_proj": "absorbed"}
    assert type(model[0].down_proj) is nn.Linear and NM.parse("1:4").is_valid(model[0].down_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=0, atol=1e-12)


def test_sinkhorn_and_hard_assignment():
    z = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = sinkhorn(z / 0.5, 200)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    torch.testing.assert_close(p.sum(-2), torch.ones(2, 4, dtype=torch.float64))
    perm = hard_assignment(z)
    for b in range(2):  # exact: no permutation of the window scores higher
        local = perm[b * 4 : (b + 1) * 4] - b * 4
        best = max(sum(float(z[b, j, q[j]]) for j in range(4)) for q in itertools.permutations(range(4)))
        assert sum(float(z[b, j, local[j]]) for j in range(4)) == pytest.approx(best)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"permute": "random"}, "permute must be one of"),
        ({"permute": "learned", "mask_kind": "transposable"}, "use mask_kind='rows'"),
        ({"permute": "oneshot", "method": "dense"}, "changes nothing for method='dense'"),
        ({"permute": "learned", "schedule": None}, "needs Schedule\\(total_steps"),
        ({"permute": "oneshot", "masks": {}}, "given masks would not match"),
        ({"permute": "dynamic", "method": "fixed"}, "method='fixed' keeps them"),
        ({"permute": "learned", "permute_config": "harden_at=0"}, "harden_at is a fraction"),
        ({"permute": "learned", "permute_config": "tau_end=2"}, "need 0 < tau_end <= tau_start"),
    ],
)
def test_bad_input_raises_one_clear_line(kwargs, message):
    base = {"method": "ste", "include": ["blocks.*"], "schedule": Schedule(total_steps=4)}
    if "permute_config" in kwargs:  # PermuteConfig checks its own fields, before any model is touched
        key, value = kwargs["permute_config"].split("=")
        with pytest.raises(UserError, match=message) as err:
            PermuteConfig(**{key: float(value)})
        assert "\n" not in str(err.value)
        return
    with pytest.raises(UserError, match=message) as err:
        SparseTraining(_model(), "2:4", **{**base, **kwargs})
    assert "\n" not in str(err.value)


def test_dynamic_moves_columns_with_the_optimizer_state_and_exports_exactly():
    model = _model()
    sparse = _sparse(model, permute="dynamic", producers=False, every=2)
    opt = _optimizer(model, sparse)
    with pytest.raises(UserError, match="pass the optimizer"):
        _train(model, sparse, opt, _batches(2))  # not bound yet: the step-2 search must refuse
    model = _model()
    sparse = _sparse(model, permute="dynamic", producers=False, every=2)
    opt = _optimizer(model, sparse)
    sparse.bind_optimizer(opt)
    _train(model, sparse, opt, _batches(3))
    wrapper = sparse.permuted["blocks.0.fc"]
    w = wrapper.inner.parametrizations.weight.original
    by_input = (
        w[:, torch.argsort(wrapper.perm)].clone(),
        opt.state[w]["exp_avg"][:, torch.argsort(wrapper.perm)].clone(),
    )
    new = torch.randperm(len(wrapper.perm), generator=torch.Generator().manual_seed(5))
    wrapper.reorder(new, opt)
    inv = torch.argsort(wrapper.perm)
    assert torch.equal(wrapper.perm, new)
    assert torch.equal(w[:, inv], by_input[0]) and torch.equal(opt.state[w]["exp_avg"][:, inv], by_input[1])
    sparse.update_masks()
    _train(model, sparse, opt, _batches(STEPS - 3))
    x = _batches(1)[0][:, :-1]
    with torch.no_grad():
        trained = model(x)
    report = sparse.finalize()
    assert report["valid"] and report["permute"]["layers"]["blocks.0.fc"] == "runtime"
    with torch.no_grad():
        assert torch.equal(model(x), trained)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_l1_l2_penalty_is_zero_exactly_on_permutations(n, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    assert float(l1_l2_penalty(perm)) == 0.0
    if n > 1:  # any doubly-stochastic matrix that is not a permutation scores above 0
        soft = sinkhorn(torch.randn(n, n, generator=g, dtype=torch.float64), 50)
        assert float(l1_l2_penalty(soft)) > 1e-6
        mix = 0.9 * perm + 0.1 * torch.roll(perm, 1, dims=0)  # two different permutations blended
        assert float(l1_l2_penalty(mix)) > 0.0
        uniform = torch.full((n, n), 1.0 / n, dtype=torch.float64)  # the largest value
        assert float(l1_l2_penalty(uniform)) == pytest.approx(1 - n**-0.5)


def test_padst_starts_random_doubly_stochastic_and_keeps_its_temperature():
    model = _model()
    sparse = _sparse(model, permute="padst", seed=7)
    wrappers = list(sparse.permuted.values())
    assert all(float(w.anchor.abs().max()) == 0.0 for w in wrappers)  # nothing pulls toward the identity
    p = wrappers[0].soft().detach()
    ones = torch.ones(p.shape[:-1], dtype=p.dtype)
    torch.testing.assert_close(p.sum(-2), ones)  # the last Sinkhorn round normalises columns
    # rows: sharp random logits converge slowly (20 rounds leave ~4%); the limit is doubly stochastic
    torch.testing.assert_close(p.sum(-1), ones, rtol=0, atol=0.06)
    tight = sinkhorn(wrappers[0].logits.detach() / wrappers[0].tau, 400)
    torch.testing.assert_close(tight.sum(-1), ones, rtol=0, atol=2e-3)
    torch.testing.assert_close(tight.sum(-2), ones)
    assert float(p.diagonal(dim1=-2, dim2=-1).mean()) < 0.5  # far from the identity, unlike learned's 0.9
    # the start is a random order, different per layer, reproducible from the seed
    assert any(not torch.equal(w.start_perm, torch.arange(len(w.start_perm))) for w in wrappers)
    assert not torch.equal(wrappers[0].logits, wrappers[1].logits)
    again = _sparse(_model(), permute="padst", seed=7)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(wrappers, again.permuted.values(), strict=True))
    other = _sparse(_model(), permute="padst", seed=8)
    assert not torch.equal(wrappers[0].logits, next(iter(other.permuted.values())).logits)
    _train(model, sparse, _optimizer(model, sparse), _batches(3))
    assert all(float(w.tau) == 1.0 for w in wrappers)


def test_padst_penalty_ramps_reaches_the_logits_and_hardens_to_a_valid_permutation():
    model = _model()
    sparse = _sparse(model, permute="padst", penalty=0.5)
    opt = _optimizer(model, sparse)
    assert float(sparse.permutation_penalty()) == 0.0  # step 0: the ramp starts at 0
    weights = []
    for b in _batches(STEPS // 2):  # harden_at 0.5: hard from step 6
        penalty = sparse.permutation_penalty()
        if sparse.steps > 0:
            with torch.no_grad():  # the weight lambda_t = penalty / mean L1-L2 of the soft matrices
                raw = torch.stack([l1_l2_penalty(w.soft()) for w in sparse.permuted.values()]).mean()
            weights.append(float(penalty.detach() / raw))
            penalty.backward()
            assert all(w.logits.grad.abs().sum() > 0 for w in sparse.permuted.values())
            opt.zero_grad()
        _train(model, sparse, opt, [b])
    torch.testing.assert_close(
        torch.tensor(weights, dtype=torch.float64), 0.5 * torch.arange(1, 6, dtype=torch.float64) / 6
    )
    assert float(sparse.permutation_penalty()) == 0.0  # hard: nothing left to drive
    for w in sparse.permuted.values():
        assert bool(w.hardened) and not w.logits.requires_grad
        assert torch.equal(torch.sort(w.perm).values, torch.arange(len(w.perm)))
        assert torch.equal(w.perm // w.block, torch.arange(len(w.perm)) // w.block)
    for mode in ("learned", "oneshot"):  # the penalty belongs to padst only
        assert float(_sparse(_model(), permute=mode).permutation_penalty()) == 0.0
