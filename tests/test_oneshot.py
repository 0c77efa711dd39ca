"""Calibrated one-shot pruning: methods against independent references, and resume."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nmkit.errors import UserError
from nmkit.oneshot import prune
from nmkit.oneshot.methods import (
    admm,
    admm_mask,
    reconstruction_error,
    refit,
    sparsegpt,
    sparsegpt_refit,
    wanda,
)
from nmkit.oneshot.stats import InputStats
from nmkit.patterns import NM, parse


def _model(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _calib(n=6, length=48, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def _layer_problem(rows=24, cols=64, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Correlated channels with uneven scales, like real activations (with independent channels
    # there is nothing for an OBS update to compensate with).
    low_rank = torch.randn(tokens, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g)
    x = (low_rank + 0.3 * torch.randn(tokens, cols, generator=g)) * torch.linspace(0.1, 3.0, cols)
    w = torch.randn(rows, cols, generator=g)
    return w, x, InputStats(x.T @ x, tokens)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "2:8"])
def test_wanda_is_weight_times_input_norm(pattern):
    w, x, stats = _layer_problem()
    out = wanda(w, stats, parse(pattern))
    p = NM.parse(pattern)
    score = (w.abs() * x.norm(dim=0)).reshape(w.shape[0], -1, p.group)
    keep = score.argsort(dim=-1, descending=True, stable=True)[..., : p.keep]
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, keep, True).reshape(w.shape)
    assert torch.equal(out != 0, expected) and torch.equal(out[expected], w[expected])


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "50%"])
def test_sparsegpt_valid_and_compensates(pattern):
    w, x, stats = _layer_problem()
    p = parse(pattern)
    out = sparsegpt(w, stats, p, damp=0.01)
    assert p.is_valid(out != 0, exact=isinstance(p, NM))
    masked_only = w * (out != 0)
    # The OBS update must beat simply zeroing the same weights, by a clear margin.
    assert reconstruction_error(w, out, stats) < 0.8 * reconstruction_error(w, masked_only, stats)
    # ... and SparseGPT's mask and update beat Wanda's mask with no update.
    assert reconstruction_error(w, out, stats) < reconstruction_error(w, wanda(w, stats, p), stats)


def test_sparsegpt_lazy_blocks_are_exact():
    """Lazy batched updates are an exact rewrite: block size changes nothing but rounding."""
    w, _, stats = _layer_problem(cols=96)
    a = sparsegpt(w, stats, NM(2, 4), blocksize=8)
    b = sparsegpt(w, stats, NM(2, 4), blocksize=96)
    assert torch.equal(a != 0, b != 0)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_sparsegpt_keeping_everything_changes_nothing():
    w, _, stats = _layer_problem()
    assert torch.allclose(sparsegpt(w, stats, parse("0%")), w, atol=1e-5)


def test_reconstruction_error_matches_direct_computation():
    w, x, stats = _layer_problem()
    w2 = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.5)
    direct = ((w - w2) @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum()
    assert reconstruction_error(w, w2, stats) == pytest.approx(direct.item(), rel=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_model_prune_is_valid(tiny_model_dir, method):
    model = _model(tiny_model_dir)
    result = prune(model, "2:4", method, calibration=_calib(), progress=False)
    assert len(result.layers) == 14 and result.all_valid
    assert all(0 < layer.rel_error < 1 for layer in result.layers)


def test_first_block_sees_unpruned_inputs_and_wanda_matches_hooked_reference(tiny_model_dir):
    """Block 0's q_proj input is the normalised embedding, identical with or without pruning."""
    ref_model = _model(tiny_model_dir)
    calib = _calib()
    inputs = []
    hook = ref_model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for s in calib:
            ref_model(s.unsqueeze(0))
    hook.remove()
    x = torch.cat(inputs)
    w = ref_model.model.layers[0].self_attn.q_proj.weight.detach()
    expected = wanda(w, InputStats(x.T @ x, x.shape[0]), NM(2, 4))

    model = _model(tiny_model_dir)
    prune(model, "2:4", "wanda", calibration=calib, progress=False)
    got = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(got != 0, expected != 0)


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
def test_refit_is_least_squares_on_the_mask(pattern):
    w, x, stats = _layer_problem(rows=6, cols=32)
    start = sparsegpt(w, stats, parse(pattern))
    keep = start != 0
    out = refit(start, keep, stats.xtx, w, damp=0.0, iters=200)
    assert torch.equal(out != 0, keep)
    # Exact per-row least squares on the kept columns (brute force with lstsq).
    for r in range(w.shape[0]):
        cols = keep[r].nonzero().squeeze(1)
        sol = torch.linalg.lstsq(x[:, cols].double(), (x @ w[r]).double()).solution
        assert torch.allclose(out[r, cols].double(), sol, atol=2e-3, rtol=2e-3)
    assert reconstruction_error(w, out, stats) <= reconstruction_error(w, start, stats) + 1e-6
    assert reconstruction_error(w, sparsegpt_refit(w, stats, parse(pattern)), stats) <= \
        reconstruction_error(w, start, stats) + 1e-6


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "2:8"])
def test_admm_is_valid_and_beats_sparsegpt_refit(pattern):
    p = parse(pattern)
    for seed in range(3):
        w, _, stats = _layer_problem(seed=seed)
        mask = admm_mask(w, stats.xtx, p)
        assert p.is_valid(mask != 0, exact=True)
        out = admm(w, stats, p)
        assert p.is_valid(out != 0, exact=True)
        # Its mask, refitted, reconstructs the layer better than SparseGPT's mask refitted.
        assert reconstruction_error(w, out, stats) < reconstruction_error(w, sparsegpt_refit(w, stats, p), stats)


def test_admm_more_iterations_reconstruct_better():
    """The penalty schedule converges: a long run ends at a better mask than a five-step one."""
    w, _, stats = _layer_problem(rows=8, cols=32)
    few = admm_mask(w, stats.xtx, NM(2, 4), iters=5)
    many = admm_mask(w, stats.xtx, NM(2, 4), iters=200)
    assert reconstruction_error(w, many, stats) < reconstruction_error(w, few, stats)


@pytest.mark.parametrize("method", ["sparsegpt-refit", "admm", "sparsegpt-block", "admm-block"])
def test_improved_methods_prune_model_validly(tiny_model_dir, method):
    model = _model(tiny_model_dir)
    result = prune(model, "4:8", method, calibration=_calib(), progress=False)
    assert len(result.layers) == 14 and result.all_valid


@pytest.mark.parametrize("method", ["sparsegpt", "sparsegpt-block"])
def test_resume_after_interruption_is_bit_identical(tiny_model_dir, tmp_path, method):
    calib = _calib()
    full = _model(tiny_model_dir)
    prune(full, "2:4", method, calibration=calib, progress=False)

    ckpt = tmp_path / "ckpt"
    first = _model(tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        prune(first, "2:4", method, calibration=calib, progress=False, checkpoint_dir=ckpt, stop_after_block=0)
    assert (ckpt / "state.json").is_file()
    resumed = _model(tiny_model_dir)  # a fresh process would start from the dense model
    result = prune(resumed, "2:4", method, calibration=calib, progress=False, checkpoint_dir=ckpt, resume=True)
    assert len(result.layers) == 14 and not ckpt.exists()
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_block_refit_fits_the_dense_block_output_and_keeps_the_mask(tiny_model_dir):
    """Each block ends closer to the dense model's block output than its layer solves left it, with the
    same zeros; the same seed gives the same weights."""
    layer_only, fitted, again = (_model(tiny_model_dir) for _ in range(3))
    prune(layer_only, "2:4", "sparsegpt-refit", calibration=_calib(), progress=False)
    result = prune(fitted, "2:4", "sparsegpt-block", calibration=_calib(), progress=False, block_lr=1e-3)
    prune(again, "2:4", "sparsegpt-block", calibration=_calib(), progress=False, block_lr=1e-3)
    assert [b["block"] for b in result.blocks] == [0, 1]
    assert all(b["output_mse_after"] < b["output_mse_before"] for b in result.blocks)
    names = {x.name for x in result.layers}
    before, after = dict(layer_only.named_parameters()), dict(fitted.named_parameters())
    for name in (f"{n}.weight" for n in names):
        if name.startswith("model.layers.0."):  # block 1's inputs differ once block 0 is refitted
            assert torch.equal(before[name] != 0, after[name] != 0), name
        assert not torch.equal(before[name], after[name]) or name.startswith("model.layers.1."), name
    for (name, a), (_, b) in zip(fitted.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_model_refit_lowers_the_kl_to_the_dense_model_and_keeps_every_mask(tiny_model_dir, tmp_path):
    """The whole-model stage ends with a lower KL to the dense logits than the block fits left, with the
    same zeros in every pruned layer (exactly N:M), deterministically; resume after the last block redoes it."""
    from nmkit.patterns import parse

    blocks_only, fitted, again = (_model(tiny_model_dir) for _ in range(3))
    calib = _calib()
    prune(blocks_only, "2:4", "sparsegpt-block", calibration=calib, progress=False)
    result = prune(fitted, "2:4", "sparsegpt-block", calibration=calib, progress=False, model_epochs=3)
    fit = result.model_refit
    assert fit["objective"] == "kl" and fit["steps"] == 3 * len(calib) // 2 and fit["after"] < fit["before"]
    before, after = dict(blocks_only.named_parameters()), dict(fitted.named_parameters())
    for name in (f"{x.name}.weight" for x in result.layers):
        assert torch.equal(before[name] != 0, after[name] != 0), name
        assert parse("2:4").is_valid(after[name] != 0), name
    assert any(not torch.equal(before[n], after[n]) for n in (f"{x.name}.weight" for x in result.layers))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):  # after the last block's checkpoint, before the model stage
        prune(again, "2:4", "sparsegpt-block", calibration=calib, progress=False, model_epochs=3,
              checkpoint_dir=ckpt, stop_after_block=1)
    again = _model(tiny_model_dir)
    prune(again, "2:4", "sparsegpt-block", calibration=calib, progress=False, model_epochs=3,
          checkpoint_dir=ckpt, resume=True)
    for (name, a), (_, b) in zip(fitted.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_block_methods_refuse_several_ranks(tiny_model_dir):
    from nmkit.oneshot.distributed import Ranks
    from nmkit.oneshot.sequential import check_distributable

    with pytest.raises(UserError, match="--nproc 1"):
        check_distributable(Ranks(0, 2), [[object(), object()]], torch.zeros(4, 8), "admm-block", False)


def test_resume_with_other_settings_is_refused(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        prune(_model(tiny_model_dir), "2:4", "wanda", calibration=_calib(), progress=False, checkpoint_dir=ckpt,
              stop_after_block=0)
    with pytest.raises(UserError, match="different settings"):
        prune(_model(tiny_model_dir), "4:8", "wanda", calibration=_calib(), progress=False, checkpoint_dir=ckpt,
              resume=True)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sparsegpt-block"])
def test_pruned_zeros_are_positive_zero(tiny_model_dir, method):
    """Pruned negative weights must not be stored as -0.0 (compressed formats keep one zero)."""
    model = _model(tiny_model_dir)
    result = prune(model, "2:4", method, calibration=_calib(), progress=False)
    weights = {n: m.weight.detach() for n, m in model.named_modules() if n in {x.name for x in result.layers}}
    assert weights and all(not ((w == 0) & torch.signbit(w)).any() for w in weights.values())


def test_calibrated_method_needs_data(tiny_model_dir):
    with pytest.raises(UserError, match="needs calibration"):
        prune(_model(tiny_model_dir), "2:4", "sparsegpt")


def test_channel_entropy_histograms():
    from nmkit.oneshot.stats import _add_histogram

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, 1, generator=g), torch.zeros(4000, 1)], dim=1)  # spread vs constant
    x[0, 1] = 1.0  # give the constant channel a range
    stats = InputStats(x.T @ x, x.shape[0])
    _add_histogram(stats, x[:2000], 32)
    _add_histogram(stats, x[2000:], 32)
    assert stats.histogram.sum(1).tolist() == [4000, 4000]
    ent = stats.entropy()
    assert ent[0] > 1.0 and ent[1] < 0.01


def test_esparse_prunes_model_validly(tiny_model_dir):
    model = _model(tiny_model_dir)
    result = prune(model, "2:4", "esparse", calibration=_calib(), progress=False)
    assert len(result.layers) == 14 and result.all_valid


@pytest.mark.parametrize("pattern", ["2:4T", "4:8T", "32:2:8", "50%"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sparsegpt-refit", "admm"])
def test_zoo_patterns_through_every_method(tiny_model_dir, pattern, method):
    """Transposable and V:N:M masks come out valid from each method (SparseGPT fixes them up front)."""
    model = _model(tiny_model_dir)
    result = prune(model, pattern, method, calibration=_calib(4, 32), progress=False)
    assert result.all_valid and len(result.layers) == 14
    p = parse(pattern)
    for name, module in model.named_modules():
        if name in {layer.name for layer in result.layers}:
            assert p.is_valid(module.weight.detach() != 0), name
