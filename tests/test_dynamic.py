"""Run-time N:M sparsity: DFSS attention scores and FFN inputs, against brute force and through HF models."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.dynamic import NMActivations, NMAttention, ffn_down_projections, nm_attention, prune_activations, score_mask
from nmkit.dynamic.attention import nm_attention_reference
from nmkit.errors import UserError
from nmkit.kernels import native as kernels_native
from nmkit.patterns import NM

PATTERNS = ["1:2", "2:4", "1:4", "4:8", "2:8"]


def brute_force_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row, per group of m keys (the last group may be short): keep the n best by (score desc, index asc)."""
    rows = scores.reshape(-1, scores.shape[-1]).tolist()
    keep = torch.zeros(len(rows), scores.shape[-1], dtype=torch.bool)
    for r, row in enumerate(rows):
        for start in range(0, len(row), m):
            idx = list(range(start, min(start + m, len(row))))
            for j in sorted(idx, key=lambda j: (-row[j], j))[:n]:
                keep[r, j] = True
    return keep.reshape(scores.shape)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 5), st.integers(1, 19), st.integers(0, 2**31 - 1),
       st.booleans())
def test_score_mask_matches_brute_force(pattern, rows, keys, seed, with_masked):
    n, m = NM.parse(pattern).keep, NM.parse(pattern).group
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, keys, generator=g).round(decimals=1)  # rounding makes ties common
    if with_masked:
        scores[torch.rand(rows, keys, generator=g) < 0.3] = -math.inf
    keep = score_mask(scores, pattern)
    assert torch.equal(keep, brute_force_keep(scores, n, m))
    # Every full group keeps exactly N; the short tail keeps min(N, its length).
    for start in range(0, keys, m):
        assert (keep[:, start:start + m].sum(-1) == min(n, min(m, keys - start))).all()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 12), st.integers(1, 21), st.integers(0, 2**31 - 1))
def test_nm_attention_is_sdpa_over_the_kept_scores(pattern, queries, keys, seed):
    n, m = NM.parse(pattern).keep, NM.parse(pattern).group
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, queries, 8, generator=g), torch.randn(2, 3, keys, 8, generator=g)
    v = torch.randn(2, 3, keys, 5, generator=g)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=brute_force_keep(scores, n, m))
    torch.testing.assert_close(nm_attention(q, k, v, pattern), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels_native.available(), reason="native kernels not built")
@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (8, 16), (2, 3), (5, 32), (1, 1)]),
       st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_compiled_top_n_fill_matches_the_reference(nm, groups, seed):
    n, m = nm
    x = torch.randn(groups, m, generator=torch.Generator().manual_seed(seed)).round(decimals=1)
    x[x < -1.5] = -math.inf
    expected = x.masked_fill(~brute_force_keep(x, n, m), -7.0)
    assert torch.equal(kernels_native.topn_fill_(x.clone(), n, m, -7.0), expected)


@pytest.mark.parametrize("keys", [16, 19])
def test_fast_and_differentiable_paths_agree(keys):
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, keys, 8, generator=g)
    v = torch.randn(2, 3, keys, 4, generator=g)
    with torch.no_grad():
        fast = nm_attention(q, k, v, "2:4", is_causal=keys == 16)
    slow = nm_attention(q.requires_grad_(), k, v, "2:4", is_causal=keys == 16)
    torch.testing.assert_close(fast, slow.detach())


# (causal, query heads, key/value heads, queries, keys, head dim, value dim): tile edges (64 keys, 48
# query rows per work unit), odd lengths, more queries than keys, one decoding query, GQA 1 and 3.
FUSED_CASES = [(True, 3, 1, 70, 70, 64, 64), (True, 2, 2, 37, 37, 80, 80), (False, 6, 2, 45, 131, 32, 40),
               (True, 3, 3, 150, 130, 64, 64), (False, 3, 1, 1, 77, 64, 64), (True, 1, 1, 113, 113, 64, 16)]


def _integer_qkv(case, seed):
    """Small integers: every score is exact in fp32 whatever the order of the additions (and ties are
    common), so the fused kernel must keep exactly the reference's keys, ties to the lower index."""
    _, hq, hkv, length, keys, dim, vdim = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (2, hq, length, dim), generator=g).float()
    k = torch.randint(-2, 3, (2, hkv, keys, dim), generator=g).float()
    return q, k, torch.randn(2, hkv, keys, vdim, generator=g)


@pytest.mark.skipif(not kernels_native.available(), reason="native kernels not built")
@pytest.mark.parametrize("isa", kernels_native.supported_isas())
@pytest.mark.parametrize("pattern", [*PATTERNS, "3:16"])  # M = 16: AVX2 takes the per-row path
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_attention_equals_the_reference(isa, pattern, case):
    nm, causal = NM.parse(pattern), case[0]
    q, k, v = _integer_qkv(case, seed=len(pattern) + case[3])
    fused = kernels_native.nm_attention(q, k, v, nm.keep, nm.group, causal=causal, scale=0.125, isa=isa)
    expected = nm_attention_reference(q, k, v, nm, is_causal=causal, scale=0.125, enable_gqa=True)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels_native.available(), reason="native kernels not built")
@pytest.mark.parametrize("isa", kernels_native.supported_isas())
def test_fused_attention_on_real_valued_scores(isa):
    """Random scores (no ties): same keys as the reference unless two scores lie within rounding."""
    g = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(1, 6, 130, 64, generator=g), torch.randn(1, 2, 130, 64, generator=g), \
        torch.randn(1, 2, 130, 64, generator=g)
    for causal in (True, False):
        fused = kernels_native.nm_attention(q, k, v, 2, 4, causal=causal, scale=0.125, isa=isa)
        expected = nm_attention_reference(q, k, v, "2:4", is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels_native.attention_is_fast(4), reason="fused attention needs the kernels and AVX2")
def test_nm_attention_dispatches_inference_to_the_fused_kernel(monkeypatch):
    calls = []
    fused = kernels_native.nm_attention
    monkeypatch.setattr(kernels_native, "nm_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    g = torch.Generator().manual_seed(12)
    # transformers' layout: (batch, length, heads, dim) viewed as (batch, heads, length, dim)
    q = torch.randn(2, 19, 6, 16, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, 19, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    with torch.no_grad():
        out = nm_attention(q, k, v, "2:4", is_causal=True, enable_gqa=True)
        half = nm_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "2:4", is_causal=True, enable_gqa=True)
        flat = nm_attention(q[0, 0], k[0, 0], v[0, 0], "2:4")  # (L, E): no batch or head dims
    assert len(calls) == 3 and half.dtype == torch.bfloat16
    torch.testing.assert_close(out, nm_attention_reference(q, k, v, "2:4", is_causal=True, enable_gqa=True))
    torch.testing.assert_close(flat, nm_attention_reference(q[0, 0], k[0, 0], v[0, 0], "2:4"))
    # Gradients, dropout, an explicit mask, a group M that does not divide 16: the torch path.
    nm_attention(q.clone().requires_grad_(), k, v, "2:4", is_causal=True, enable_gqa=True)
    with torch.no_grad():
        nm_attention(q, k, v, "2:4", dropout_p=0.1, enable_gqa=True)
        nm_attention(q, k, v, "2:4", attn_mask=torch.ones(19, 19, dtype=torch.bool), enable_gqa=True)
        nm_attention(q, k, v, "2:6", is_causal=True, enable_gqa=True)
    assert len(calls) == 3
    with pytest.raises(UserError, match="enable_gqa"):
        nm_attention(q, k[:, :1].expand(2, 4, 19, 16), v, enable_gqa=True)


def test_bf16_attention_follows_the_fp32_reference():
    g = torch.Generator().manual_seed(9)
    q, k, v = (t.bfloat16() for t in torch.randn(3, 1, 2, 12, 16, generator=g).unbind(0))
    with torch.no_grad():
        fast = nm_attention(q, k, v, "2:4", is_causal=True)
    reference = nm_attention(q.requires_grad_(), k, v, "2:4", is_causal=True)  # torch path, bf16 scores
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast, reference.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_query_blocks_change_nothing(causal):
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(3, 2, 3, 23, 8, generator=g).unbind(0)
    mask = None if causal else torch.rand(2, 1, 23, 23, generator=g) > 0.3
    whole = nm_attention(q, k, v, "2:4", is_causal=causal, attn_mask=mask, block=64)
    for block in (1, 5, 8):
        torch.testing.assert_close(nm_attention(q, k, v, "2:4", is_causal=causal, attn_mask=mask, block=block), whole)


@pytest.mark.parametrize("pattern", ["2:4", "1:2", "2:8"])
def test_causal_flag_bool_mask_and_additive_mask_agree(pattern):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 4, 13, 16, generator=g).unbind(0)
    allowed = torch.ones(13, 13, dtype=torch.bool).tril()
    additive = torch.zeros(13, 13).masked_fill(~allowed, torch.finfo(torch.float32).min)
    causal = nm_attention(q, k, v, pattern, is_causal=True)
    torch.testing.assert_close(nm_attention(q, k, v, pattern, attn_mask=allowed), causal)
    torch.testing.assert_close(nm_attention(q, k, v, pattern, attn_mask=additive), causal)
    # The first query sees one key only, so it reads that key's value exactly.
    torch.testing.assert_close(causal[..., 0, :], v[..., 0, :])


def test_gradients_reach_only_kept_keys():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 8, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 8, 4, generator=g, requires_grad=True)
    nm_attention(q, k, v, "2:4").sum().backward()
    kept = score_mask(q.detach() @ k.detach().transpose(-2, -1) / math.sqrt(8), "2:4")[0, 0, 0]
    assert kept.sum() == 4
    assert (v.grad[0, 0][~kept] == 0).all() and (v.grad[0, 0][kept] != 0).all()
    assert (k.grad[0, 0][~kept] == 0).all() and torch.isfinite(q.grad).all()


def test_bad_inputs_are_named():
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 4, 6), torch.randn(1, 4, 8)
    with pytest.raises(UserError, match="feature sizes differ"):
        nm_attention(q, k, v)
    with pytest.raises(UserError, match="not both"):
        nm_attention(q, q, v, attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)
    with pytest.raises(UserError, match="keep N of every M"):
        nm_attention(q, q, v, "4:4")


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_hf_attention_switches_and_restores(tiny_llama):
    ids = torch.randint(3, 300, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = tiny_llama(ids).logits
        with NMAttention(tiny_llama, "2:4") as handle:
            assert tiny_llama.config._attn_implementation == handle.name
            sparse = tiny_llama(ids).logits
        assert tiny_llama.config._attn_implementation == "sdpa"
        assert torch.equal(tiny_llama(ids).logits, dense)
        with NMAttention(tiny_llama, "2:4", layers=[]):
            torch.testing.assert_close(tiny_llama(ids).logits, dense)
        with NMAttention(tiny_llama, "2:4", layers=[0]):
            first_only = tiny_llama(ids).logits
    assert not torch.allclose(sparse, dense, atol=1e-4)
    assert not torch.allclose(first_only, dense, atol=1e-4) and not torch.allclose(first_only, sparse, atol=1e-4)


def test_hf_attention_matches_the_reference_per_layer(tiny_llama):
    """The registered function on grouped-query heads equals nm_attention on repeated key/value heads."""
    attn = tiny_llama.model.layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    q, kv = torch.randn(1, 4, 11, 16, generator=g), torch.randn(2, 1, 2, 11, 16, generator=g)
    with NMAttention(tiny_llama, "2:4") as handle:
        from transformers import AttentionInterface

        fn = AttentionInterface()[handle.name]
        out, _ = fn(attn, q, kv[0], kv[1], None, scaling=0.25)  # no mask: a decoder is causal
        padded = torch.ones(1, 1, 11, 11, dtype=torch.bool).tril()
        padded[..., 0] = False  # e.g. a left-padded first token
        masked, _ = fn(attn, q, kv[0], kv[1], padded, scaling=0.25)
    k, v = kv[0].repeat_interleave(2, 1), kv[1].repeat_interleave(2, 1)
    torch.testing.assert_close(out, nm_attention(q, k, v, "2:4", scale=0.25, is_causal=True).transpose(1, 2))
    expected = nm_attention(q, k, v, "2:4", scale=0.25, attn_mask=padded)
    torch.testing.assert_close(masked[:, 1:], expected.transpose(1, 2)[:, 1:])


def test_cached_decoding_equals_full_recompute(tiny_llama):
    """With a KV cache each new token prunes its own score row, exactly as a full forward pass does."""
    prompt = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), NMAttention(tiny_llama, "2:4"):
        cached = tiny_llama.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                                     pad_token_id=2)
        ids = prompt
        for _ in range(8):
            nxt = tiny_llama(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


def test_layers_are_checked(tiny_llama):
    with pytest.raises(UserError, match=r"layers \[7\] do not exist"):
        NMAttention(tiny_llama, "2:4", layers=[0, 7])
    assert tiny_llama.config._attn_implementation == "sdpa"
    with pytest.raises(UserError, match="PreTrainedModel"):
        NMAttention(torch.nn.Linear(4, 4), "2:4")


def test_padding_does_not_change_an_encoder_sentence():
    """Padded keys are masked, so they never displace a real key from its group."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64)).eval()
    ids = torch.randint(5, 99, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 7)], dim=1).long()
    with torch.no_grad(), NMAttention(model, "2:4"):
        alone = model(ids).last_hidden_state
        batch = model(padded, attention_mask=mask).last_hidden_state[:, :10]
        dense_alone = None
    with torch.no_grad():
        dense_alone = model(ids).last_hidden_state
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone, dense_alone, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_prune_activations_keeps_the_largest_magnitudes(pattern, rows, groups, seed):
    n, m = NM.parse(pattern).keep, NM.parse(pattern).group
    x = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    out = prune_activations(x, pattern)
    keep = brute_force_keep(x.abs(), n, m)
    assert torch.equal(out, torch.where(keep, x, torch.zeros_like(x)))


def test_prune_activations_rejects_a_width_that_m_does_not_divide():
    with pytest.raises(UserError, match="not a multiple of M=8"):
        prune_activations(torch.randn(2, 12), "2:8")


def test_ffn_inputs_are_pruned_and_restored(tiny_llama):
    names = ffn_down_projections(tiny_llama)
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    seen = []
    down = tiny_llama.model.layers[1].mlp.down_proj
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = tiny_llama(ids).logits
        with NMActivations(tiny_llama, "2:8"):
            probe = down.register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # runs after the pruning hook
            sparse = tiny_llama(ids).logits
            probe.remove()
        again = tiny_llama(ids).logits
    assert ((seen[0] != 0).reshape(-1, 8).sum(-1) == 2).all()
    assert torch.equal(again, dense) and not torch.allclose(sparse, dense, atol=1e-4)
    with pytest.raises(UserError, match="no Linear layer matched"):
        NMActivations(tiny_llama, "2:4", targets=["*.nothing"])


def test_bench_dynamic_on_the_tiny_model(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    import json

    from nmkit.cli import main

    common = ["--eval-seqlen", "64", "--eval-windows", "2", "--data-dir", str(tiny_data_dir)]
    assert main(["eval", str(tiny_model_dir), *common, "--attention", "2:4", "--baseline", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    out = tmp_path / "dyn.json"
    code = main(["bench", "dynamic", str(tiny_model_dir), *common, "--config", "attention=2:4",
                 "--config", "attention=2:4@0,activations=2:4", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [r["config"] for r in result["results"]] == ["attention=2:4", "attention=2:4@0,activations=2:4"]
    assert result["baseline_ppl"] == pytest.approx(single["ppl_baseline"], rel=1e-6)
    assert result["results"][0]["ppl"] == pytest.approx(single["ppl"], rel=1e-6)
    assert "| attention=2:4 |" in capsys.readouterr().out


@pytest.mark.parametrize("spec, message", [("attn=2:4", "use attention=N:M"), ("", "sets no run-time sparsity"),
                                           ("attention=2:4@x", "layer numbers")])
def test_bench_dynamic_config_errors(spec, message):
    from nmkit.bench.dynamic import parse_config

    with pytest.raises(UserError, match=message):
        parse_config(spec)
