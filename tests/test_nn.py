"""SparseLinear and compress(): exact outputs vs the masked dense layer, inference_mode, compile, generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmkit.nn import SparseLinear, compress, detect_pattern
from nmkit.patterns import NM, PatternError
from nmkit.solvers.nm import nm_mask


def _pruned_linear(i, o, pattern, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs(), pattern))
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:16"])
def test_from_dense_matches(dtype, pattern):
    lin = _pruned_linear(96, 40, pattern, dtype)
    s = SparseLinear.from_dense(lin, pattern)
    x = torch.randn(2, 3, 96).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        torch.testing.assert_close(s(x).float(), lin(x).float(), rtol=tol, atol=tol)
    assert torch.equal(s.weight, lin.weight.detach())


def test_from_dense_rejects_unpruned():
    with pytest.raises(PatternError):
        SparseLinear.from_dense(nn.Linear(16, 8), "2:4")


def test_dense_fallback_path():
    lin = _pruned_linear(64, 32, "2:4")
    s = SparseLinear.from_dense(lin, "2:4", dense_from_batch=4)
    for b in (1, 8):
        x = torch.randn(b, 64)
        torch.testing.assert_close(s(x), lin(x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    lin = _pruned_linear(64, 32, "2:8")
    s = SparseLinear.from_dense(lin, "2:8")
    s2 = SparseLinear(64, 32, "2:8")
    s2.load_state_dict(s.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(s2(x), s(x))


def test_detect_pattern():
    assert detect_pattern(_pruned_linear(64, 8, "2:4").weight) == NM(2, 4)
    assert detect_pattern(_pruned_linear(64, 8, "1:4").weight) == NM(1, 4)
    assert detect_pattern(_pruned_linear(64, 8, "2:8").weight) == NM(2, 8)
    assert detect_pattern(torch.randn(8, 64)) is None


def test_torch_compile():
    lin = _pruned_linear(64, 32, "2:4")
    s = SparseLinear.from_dense(lin, "2:4")
    cs = torch.compile(s, fullgraph=True, backend="eager")
    x = torch.randn(5, 64)
    torch.testing.assert_close(cs(x), lin(x), rtol=1e-5, atol=1e-5)


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    s = SparseLinear.from_dense(_pruned_linear(64, 32, "2:4"), "2:4")
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 7, 64))
        out = torch.ops.nmkit.nm_linear(x, mode.from_tensor(s.values), mode.from_tensor(s.mask), 32, 64, 2, 4)
        assert out.shape == (2, 7, 32)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and "lm_head" not in name:
                mod.weight.mul_(nm_mask(mod.weight.abs(), "2:4"))
    return model


def test_compress_generate_same_tokens():
    model = _tiny_llama()
    ids = torch.randint(0, 300, (1, 6))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    report = compress(model, measure=False)
    assert len(report.changed) == 14 and all("lm_head" not in n for n in report.changed)
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ref, out)


def test_compress_measures_and_reports():
    model = _tiny_llama()
    report = compress(model, "2:4", batches=(1, 4), rounds=2, cold_mb=1)
    assert len(report.layers) == 14
    for layer in report.layers:
        assert layer.choice in ("sparse", "dense") and set(layer.ratios) == {1, 4}
        mod = model.get_submodule(layer.name)
        assert isinstance(mod, SparseLinear) == (layer.choice == "sparse")
    assert "Linear layers now SparseLinear" in str(report)


def test_compress_skips_dense_layers():
    model = nn.Sequential(nn.Linear(32, 16), _pruned_linear(32, 16, "2:4"))
    report = compress(model, measure=False)
    assert report.changed == ["1"] and report.layers[0].choice == "dense"


def test_keep_dense_fallback():
    lin = _pruned_linear(64, 32, "2:4")
    s = SparseLinear.from_dense(lin, "2:4", dense_from_batch=4)
    s.dense_weight = lin.weight.detach().clone()
    x = torch.randn(8, 64)
    torch.testing.assert_close(s(x), lin(x))
    assert "dense_weight" not in s.state_dict()
