"""Block-skipping attention: masks against brute force, outputs against torch's SDPA with the dense mask."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nmkit.dynamic.block_mask import BlockMask, causal_mask, document_mask, select_blocks
from nmkit.dynamic.block_sparse import BlockAttention, block_attention
from nmkit.errors import UserError
from nmkit.solvers.nm import nm_mask


def _qkv(batch, q_heads, kv_heads, length, kv_length=None, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv_length = length if kv_length is None else kv_length
    return (torch.randn(batch, q_heads, length, dim, generator=gen),
            torch.randn(batch, kv_heads, kv_length, dim, generator=gen),
            torch.randn(batch, kv_heads, kv_length, dim + 3, generator=gen))


def _sdpa(q, k, v, mask: BlockMask) -> torch.Tensor:
    dense = mask.to_dense()
    if dense.shape[1] > 1:  # one mask per key/value head: the query heads of its group share it
        dense = dense.repeat_interleave(q.shape[1] // k.shape[1], 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)


def _brute_causal(length, kv_length, window):
    q = torch.arange(length)[:, None] + kv_length - length
    kv = torch.arange(kv_length)[None, :]
    allowed = kv <= q
    return allowed if window is None else allowed & (q - kv < window)


def _check_full_blocks(mask: BlockMask, dense: torch.Tensor) -> None:
    """Every block marked full really has every pair allowed (so skipping its rule changes nothing)."""
    if mask.full is None:
        return
    b = mask.block
    for idx in mask.full.nonzero().tolist():
        bi, hi, qi, slot = idx
        kj = int(mask.kv_blocks[bi, hi, qi, slot])
        tile = dense[min(bi, dense.shape[0] - 1), min(hi, dense.shape[1] - 1), qi * b:(qi + 1) * b, kj * b:(kj + 1) * b]
        assert tile.all(), f"block ({qi}, {kj}) is marked full but has masked pairs"


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 70), extra=st.integers(0, 20), block=st.sampled_from([1, 4, 16, 32]),
       window=st.one_of(st.none(), st.integers(1, 40)))
def test_causal_mask_is_the_brute_force_mask(length, extra, block, window):
    mask = causal_mask(length, block, window=window, kv_length=length + extra)
    dense = mask.to_dense()[0, 0]
    assert torch.equal(dense, _brute_causal(length, length + extra, window))
    _check_full_blocks(mask, mask.to_dense())


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(0, 3), min_size=1, max_size=60), block=st.sampled_from([1, 4, 16]),
       causal=st.booleans(), packed=st.booleans())
def test_document_mask_is_the_brute_force_mask(ids, block, causal, packed):
    docs = torch.tensor(sorted(ids) if packed else ids)[None]
    mask = document_mask(docs, block, causal=causal)
    brute = docs[0][:, None] == docs[0][None, :]
    if causal:
        brute &= torch.ones_like(brute).tril()
    assert torch.equal(mask.to_dense()[0, 0], brute)
    _check_full_blocks(mask, mask.to_dense())


@pytest.mark.parametrize("length,kv_length,block,window", [
    (100, 100, 16, None), (100, 100, 16, 23), (70, 130, 32, 50), (64, 64, 64, 64), (5, 5, 8, 2), (1, 37, 8, 9),
])
@pytest.mark.parametrize("batch,q_heads,kv_heads", [(1, 3, 3), (2, 6, 2)])
def test_sliding_window_equals_sdpa_with_the_mask(length, kv_length, block, window, batch, q_heads, kv_heads):
    q, k, v = _qkv(batch, q_heads, kv_heads, length, kv_length)
    mask = causal_mask(length, block, window=window, kv_length=kv_length)
    torch.testing.assert_close(block_attention(q, k, v, mask), _sdpa(q, k, v, mask), atol=2e-6, rtol=1e-5)


def test_a_window_skips_blocks():
    mask = causal_mask(1024, 64, window=128)
    assert mask.kv_blocks.shape[-1] == 3  # its own block, the one before, and the edge of the window
    assert mask.density() < 3 / 16


@pytest.mark.parametrize("causal", [True, False])
def test_documents_equal_sdpa_with_the_mask(causal):
    q, k, v = _qkv(2, 4, 2, 100)
    docs = torch.tensor([[0] * 30 + [1] * 50 + [2] * 20, [0] * 5 + [1] * 95])
    mask = document_mask(docs, 16, causal=causal)
    assert mask.density() < 1
    torch.testing.assert_close(block_attention(q, k, v, mask), _sdpa(q, k, v, mask), atol=2e-6, rtol=1e-5)


def _block_means(x, block):
    return torch.stack([x[..., i:i + block, :].mean(-2) for i in range(0, x.shape[-2], block)], -2)


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "1:3"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_selected_blocks_are_the_top_n_of_every_m(pattern, causal, shared):
    q, k, v = _qkv(2, 6, 3, 90, seed=3)
    block, (n, m) = 8, map(int, pattern.split(":"))
    mask = select_blocks(q, k, pattern, block, causal=causal, shared_heads=shared)
    estimate = _block_means(q, block).unflatten(1, (3, 2)).mean(2) @ _block_means(k, block).transpose(-2, -1)
    if shared:
        estimate = (_block_means(q, block).unflatten(1, (3, 2)).mean(2).mean(1, keepdim=True)
                    @ _block_means(k, block).mean(1, keepdim=True).transpose(-2, -1))
    keep = mask.block_keep()
    blocks = estimate.shape[-1]
    for i in range(blocks):
        for start in range(0, blocks, m):
            group = range(start, min(blocks, start + m))
            allowed = [j for j in group if not causal or j <= i]
            for b in range(keep.shape[0]):
                for h in range(keep.shape[1]):
                    kept = {j for j in group if keep[b, h, i, j]}
                    assert kept <= set(allowed) and len(kept) == min(n, len(allowed))
                    if causal and i in allowed:  # its own block is always read, in one of the N places
                        assert i in kept
                    scores = estimate[b, h, i]  # every block left out scores at most every one chosen
                    others = [j for j in allowed if j not in kept and j != i]
                    contenders = [j for j in kept if not (causal and j == i)]
                    assert all(scores[o] <= scores[c] for o in others for c in contenders)
    torch.testing.assert_close(block_attention(q, k, v, mask), _sdpa(q, k, v, mask), atol=2e-6, rtol=1e-5)


def test_selection_uses_the_library_n_m_rule_without_causality():
    q, k, _ = _qkv(1, 2, 2, 64, seed=5)
    mask = select_blocks(q, k, "2:4", 8, causal=False)
    estimate = _block_means(q, 8) @ _block_means(k, 8).transpose(-2, -1)
    assert torch.equal(mask.block_keep(), nm_mask(estimate, "2:4", dim=-1, tail="pad"))


def test_a_query_with_nothing_to_see_gets_zeros_like_sdpa():
    q, k, v = _qkv(1, 4, 2, 40)
    keep = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    keep[0, 0, 2] = False  # query block 2 reads no block at all

    def rule(b, h, qi, kv):
        return (kv <= qi) & (qi != 3)  # query 3 may attend to nothing

    mask = BlockMask.from_block_keep(keep, 8, 40, 40, rule)
    out = block_attention(q, k, v, mask)
    assert not out.isnan().any()
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.equal(out[:, :, 16:24], torch.zeros_like(out[:, :, 16:24]))
    torch.testing.assert_close(out, _sdpa(q, k, v, mask), atol=2e-6, rtol=1e-5)


def test_gradients_equal_sdpa_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 50))
    mask = causal_mask(50, 8, window=12)
    grads = torch.autograd.grad(block_attention(q, k, v, mask).square().sum(), (q, k, v))
    expected = torch.autograd.grad(_sdpa(q, k, v, mask).square().sum(), (q, k, v))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_named():
    q, k, v = _qkv(1, 4, 2, 20)
    with pytest.raises(UserError, match="mask is for"):
        block_attention(q, k, v, causal_mask(21, 8))
    with pytest.raises(UserError, match="share"):
        block_attention(q[:, :3], k, v, causal_mask(20, 8))
    with pytest.raises(UserError, match="window"):
        causal_mask(20, 8, window=0)
    with pytest.raises(UserError, match="document_ids"):
        document_mask(torch.zeros(20), 8)
    with pytest.raises(UserError, match="block keep"):
        BlockMask.from_block_keep(torch.ones(1, 1, 2, 2, dtype=torch.bool), 8, 20, 20)


@pytest.fixture(scope="module")
def tiny_mistral():
    """A 2-layer Mistral (a Llama with a sliding window of 13 keys)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=13)
    return MistralForCausalLM(config).eval()


def _logits(model, implementation, ids, mask=None):
    model.set_attn_implementation(implementation)
    return model(ids, attention_mask=mask).logits


def test_hf_sliding_window_model_gives_the_sdpa_and_eager_logits(tiny_mistral):
    ids = torch.randint(0, 100, (2, 70), generator=torch.Generator().manual_seed(1))
    padded = torch.ones_like(ids)
    padded[1, :9] = 0  # left padding
    with torch.no_grad():
        for mask in (None, padded):
            sdpa, eager = _logits(tiny_mistral, "sdpa", ids, mask), _logits(tiny_mistral, "eager", ids, mask)
            with BlockAttention(tiny_mistral, block=8) as handle:
                assert tiny_mistral.config._attn_implementation == handle.name
                out = tiny_mistral(ids, attention_mask=mask).logits
            assert tiny_mistral.config._attn_implementation == "eager"
            torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)
            real = slice(None) if mask is None else (slice(0, 1),)  # eager gives padded rows no zeros
            torch.testing.assert_close(out[real], eager[real], atol=1e-5, rtol=1e-5)


def test_hf_sliding_window_reads_only_the_window(tiny_mistral, monkeypatch):
    import nmkit.dynamic.block_sparse as module

    seen = []
    real = module.block_attention

    def spy(q, k, v, mask, **kwargs):
        seen.append(mask)
        return real(q, k, v, mask, **kwargs)

    monkeypatch.setattr(module, "block_attention", spy)
    with torch.no_grad(), BlockAttention(tiny_mistral, block=8):
        tiny_mistral(torch.zeros(1, 64, dtype=torch.long))
    assert len(seen) == 2 and all(mask.kv_blocks.shape[-1] == 3 for mask in seen)  # 13 keys span at most 3 blocks


def test_hf_cached_generation_equals_sdpa(tiny_mistral):
    prompt = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiny_mistral.set_attn_implementation("sdpa")
        expected = tiny_mistral.generate(prompt, max_new_tokens=10, do_sample=False)
        with BlockAttention(tiny_mistral, block=8):
            got = tiny_mistral.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)


def test_hf_causal_llama_gives_the_sdpa_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 300, (2, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sdpa = _logits(model, "sdpa", ids)
        with BlockAttention(model, block=16):
            out = model(ids).logits
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


def test_hf_block_selection(tiny_mistral):
    ids = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sdpa = _logits(tiny_mistral, "sdpa", ids)
        # a 13-key window reaches at most 5 blocks of 4, so 7 of every 8 keeps them all: nothing changes
        with BlockAttention(tiny_mistral, block=4, select="7:8"):
            torch.testing.assert_close(tiny_mistral(ids).logits, sdpa, atol=1e-5, rtol=1e-5)
        with BlockAttention(tiny_mistral, block=4, select="1:4"):
            sparse = tiny_mistral(ids).logits
    assert sparse.isfinite().all() and not torch.allclose(sparse, sdpa, atol=1e-3)


def test_hf_encoder_runs_sdpa_unchanged():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask).last_hidden_state
        with BlockAttention(model, block=4):
            out = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, sdpa)
