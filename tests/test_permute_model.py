"""Model-level permutation pass: a tiny random Llama computes the same logits before pruning."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nmkit.permute_model import PermutedInput, permute_model  # noqa: E402
from nmkit.solvers.permutation import kept_by_nm  # noqa: E402


def _tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("runtime_index", [False, True])
def test_outputs_unchanged_and_nm_keeps_more(runtime_index: bool) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    downs_before = [kept_by_nm(layer.mlp.down_proj.weight.abs(), "2:4") for layer in model.model.layers]
    report = permute_model(model, "2:4", time_budget_s=5.0, runtime_index=runtime_index, max_escapes=0, method="pairs")
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    kinds = {c.kind for c in report.changes}
    assert "absorbed" in kinds and (("runtime" in kinds) == runtime_index)
    for c in report.changes:
        assert c.kept >= c.kept_default - 1e-6
    downs_after = [kept_by_nm(layer.mlp.down_proj.weight.abs(), "2:4") for layer in model.model.layers]
    assert all(a >= b - 1e-6 for a, b in zip(downs_after, downs_before, strict=True))
    assert sum(downs_after) > sum(downs_before)
    if runtime_index:
        assert isinstance(model.model.layers[0].self_attn.q_proj, PermutedInput)
        assert not isinstance(model.lm_head, PermutedInput)
