"""`prune(..., permute=True)`: channel permutations inside the one-shot pipeline."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nmkit.errors import UserError
from nmkit.oneshot import prune
from nmkit.oneshot.blocks import capture_block_inputs, find_blocks
from nmkit.oneshot.permute import importance, permute_block
from nmkit.oneshot.stats import StatsCollector
from nmkit.oneshot.targets import find_targets
from nmkit.patterns import NM
from nmkit.solvers.permutation import kept_by_nm


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _calib(n=6, length=48, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def _block_stats(model, calib):
    prefix, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks[0], calib, torch.device("cpu"))
    targets = [t for t in find_targets(model) if t.name.startswith(f"{prefix}.0.")]
    with StatsCollector(targets) as collector:
        collector.new_batch()
        out = blocks[0](hidden, **kwargs)
    return blocks[0], targets, collector.stats, hidden, kwargs, out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@torch.no_grad()
def test_permute_block_keeps_function_and_permutes_stats(tiny_model_dir, method):
    model = _model(tiny_model_dir)
    calib = _calib()
    block, targets, stats, hidden, kwargs, before = _block_stats(model, calib)
    by_name = {t.name: t for t in targets}
    consumers = [n for n in by_name if n.endswith(("down_proj", "o_proj"))]
    kept_before = {n: kept_by_nm(importance(method, by_name[n].weight, stats[n]), NM(2, 4)) for n in consumers}

    changes = permute_block(block, targets, stats, NM(2, 4), method, time_budget_s=5.0)

    assert sorted(c.name for c in changes) == sorted(consumers)
    after = block(hidden, **kwargs)
    after = after[0] if isinstance(after, tuple) else after
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # the block computes the same function
    # The permuted statistics are those of the permuted block (recollected from scratch).
    with StatsCollector(targets) as fresh:
        fresh.new_batch()
        block(hidden, **kwargs)
    for c in changes:
        torch.testing.assert_close(stats[c.name].xtx, fresh.stats[c.name].xtx, rtol=1e-4, atol=1e-3)
        kept = kept_by_nm(importance(method, by_name[c.name].weight, stats[c.name]), NM(2, 4))
        assert kept >= kept_before[c.name] * (1 - 1e-6)  # never worse than no permutation
        assert c.kept == pytest.approx(kept, rel=1e-4)


def test_prune_with_permute_is_valid_and_keeps_more(tiny_model_dir):
    calib = _calib()
    plain, permuted = _model(tiny_model_dir), _model(tiny_model_dir)
    prune(plain, "2:4", "wanda", calibration=calib, progress=False)
    result = prune(permuted, "2:4", "wanda", calibration=calib, progress=False, permute=True, permute_budget_s=5.0)
    assert result.all_valid and len(result.permutations) == 4  # down_proj and o_proj in 2 blocks
    assert all(c.kept >= c.kept_default * (1 - 1e-6) for c in result.permutations)
    assert any(c.gain > 0 for c in result.permutations)


def test_magnitude_permute_keeps_more_magnitude(tiny_model_dir):
    plain, permuted = _model(tiny_model_dir), _model(tiny_model_dir)
    dense = {n: p.detach().abs().sum() for n, p in plain.named_parameters()}
    prune(plain, "2:4", "magnitude", progress=False)
    result = prune(permuted, "2:4", "magnitude", progress=False, permute=True, permute_budget_s=5.0)
    assert result.all_valid and result.permutations
    for c in result.permutations:
        name = f"{c.name}.weight"
        kept_plain = plain.get_parameter(name).abs().sum()
        kept_perm = permuted.get_parameter(name).abs().sum()
        assert kept_perm >= kept_plain * (1 - 1e-6) and kept_perm <= dense[name]


def test_permute_resume_is_bit_identical(tiny_model_dir, tmp_path):
    calib = _calib()
    opts = {"calibration": calib, "progress": False, "permute": True, "permute_budget_s": 30.0}
    full = _model(tiny_model_dir)
    prune(full, "2:4", "wanda", **opts)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        prune(_model(tiny_model_dir), "2:4", "wanda", checkpoint_dir=ckpt, stop_after_block=0, **opts)
    resumed = _model(tiny_model_dir)
    result = prune(resumed, "2:4", "wanda", checkpoint_dir=ckpt, resume=True, **opts)
    assert len(result.permutations) == 4
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_permute_rejects_structured_patterns(tiny_model_dir):
    with pytest.raises(UserError, match="plain N:M"):
        prune(_model(tiny_model_dir), "2:4T", "wanda", calibration=_calib(), progress=False, permute=True)
