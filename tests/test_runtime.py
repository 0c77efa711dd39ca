"""The decode runtime: every kernel kind and ISA path against the torch reference, the activation
quantizer bit for bit, and whole-model forward passes against Hugging Face's."""

from __future__ import annotations

import ctypes

import pytest
import torch

from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.runtime import Engine, complete, native
from nmkit.runtime.engine import detect_nm
from nmkit.runtime.pack import from_codes, native_matmul, pack, quantize_activations, reference_matmul
from nmkit.solvers.nm import nm_mask

pytestmark = pytest.mark.skipif(not native.available(), reason="runtime library not built")

PATTERNS = [None, NM(2, 4), NM(1, 4), NM(2, 8), NM(4, 8), NM(8, 16), NM(1, 2), NM(3, 8), NM(1, 16), NM(3, 4)]
KINDS = ["fp32", "bf16", "int8", "int4"]


def _isas() -> list[str]:
    return native.supported_isas() if native.available() else []


def _pruned(rows: int, cols: int, pattern: NM | None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return w if pattern is None else w * nm_mask(w.abs(), pattern)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(37, 192), (16, 64), (5, 576)])
def test_kernels_match_reference_on_every_isa(pattern, kind, shape):
    rows, cols = shape
    w = _pruned(rows, cols, pattern)
    bias = torch.randn(rows)
    for group_blocks in ((1, 2, 4) if kind.startswith("int") else (1,)):
        p = pack(w, kind, pattern, bias=bias, group_blocks=group_blocks)
        for tokens in (1, 3, 37):  # 37: the prefill panels (16-token tiles and a partial one)
            x = torch.randn(tokens, cols) * 3
            ref = reference_matmul(p, x)
            for isa in _isas():
                for threads in (1, 2):
                    y = native_matmul(p, x, native.ISAS.index(isa), threads)
                    err = (y - ref).abs().max() / ref.abs().max()
                    assert err < 2e-5, (isa, group_blocks, tokens, threads, float(err))


@pytest.mark.parametrize("pattern", [None, NM(2, 4), NM(1, 4), NM(2, 8), NM(4, 8), NM(8, 16)], ids=str)
def test_int4_level_tables_match_reference_on_every_isa(pattern):
    # a fitted 16-level table: the kernels look each nibble up instead of subtracting 8
    g = torch.Generator().manual_seed(3)
    rows, cols = 37, 576
    table = torch.sort(torch.randperm(255, generator=g)[:16] - 127).values.to(torch.int8)
    scores = torch.rand(rows, cols, generator=g)
    keep = torch.ones(rows, cols, dtype=torch.bool) if pattern is None else nm_mask(scores, pattern)
    k64 = 64 * (pattern.keep if pattern else 1) // (pattern.group if pattern else 1)
    codes = table[torch.randint(0, 16, (rows, cols // 64, k64), generator=g)]
    scales = (torch.rand(rows, cols // 64, generator=g) + 0.5).half()
    p = from_codes(codes, scales, keep, pattern, 4, 1, bias=torch.randn(rows), levels=tuple(table.tolist()))
    assert torch.equal(p.codes(), codes)
    for tokens in (1, 37):
        x = torch.randn(tokens, cols) * 3
        ref = reference_matmul(p, x)
        for isa in _isas():
            y = native_matmul(p, x, native.ISAS.index(isa), 2)
            assert ((y - ref).abs().max() / ref.abs().max()) < 2e-5, (isa, tokens)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_packing_keeps_pattern_and_error_bounds(pattern, kind):
    w = _pruned(24, 128, pattern, seed=1)
    p = pack(w, kind, pattern)
    dq = p.dense_weight()
    assert torch.equal(dq != 0, (w != 0) & (dq != 0))  # nothing appears where the weight was pruned
    if p.pattern is not None:  # the integer kinds may run a denser pattern the weight also follows
        assert p.pattern.is_valid(p.kept_mask())
        assert p.pattern.keep / p.pattern.group >= pattern.keep / pattern.group
    if kind == "fp32":
        assert torch.equal(dq, w)
    if kind == "bf16":
        assert torch.equal(dq, w.to(torch.bfloat16).float())
    if kind.startswith("int"):
        codes = p.codes()
        lo, hi = (-127, 127) if kind == "int8" else (-8, 7)
        assert int(codes.min()) >= lo and int(codes.max()) <= hi
        # each value within half a step of its group's scale (clipping may add at most the clipped part)
        step = p.scales.float().repeat_interleave(p.group_blocks, 1)[:, : 128 // 64]
        kept = w[p.kept_mask()].reshape(24, 2, -1)
        err = (dq[p.kept_mask()].reshape(24, 2, -1) - kept).abs()
        clip = (kept.abs() - step.unsqueeze(-1) * hi).clamp(min=0)
        assert bool((err <= step.unsqueeze(-1) / 2 + clip + 1e-6).all())


def test_integer_kinds_run_patterns_their_units_cannot_hold_as_denser_ones():
    from nmkit.runtime.pack import unit_pattern

    assert unit_pattern(NM(2, 4)) == NM(2, 4) and unit_pattern(NM(1, 8)) == NM(1, 8)
    assert unit_pattern(NM(3, 8)) == NM(4, 8) and unit_pattern(NM(1, 16)) == NM(2, 16)
    assert unit_pattern(NM(3, 4)) is None and unit_pattern(NM(5, 8)) is None
    w = _pruned(16, 128, NM(3, 8))
    assert pack(w, "int8", NM(3, 8)).pattern == NM(4, 8)
    assert pack(w, "fp32", NM(3, 8)).pattern == NM(3, 8)  # the float kinds keep it (tiled by position)
    for pattern, tiled in ((NM(2, 8), True), (NM(4, 8), True), (NM(8, 16), True), (NM(1, 8), False)):
        w = _pruned(16, 128, pattern)
        for kind in ("int8", "int4"):  # 4 or 8 kept per 16 inputs decode from 16-row tiles
            p = pack(w, kind, pattern)
            assert p.pattern == pattern and p.quant_tiled == tiled and (p.decode_tiles() is not None) == tiled
            assert torch.equal(p.dense_weight() != 0, (w != 0) & (p.dense_weight() != 0))


def test_pack_refuses_a_weight_that_breaks_its_pattern():
    w = torch.randn(4, 64)
    with pytest.raises(UserError, match="does not follow 2:4"):
        pack(w, "int4", NM(2, 4), name="layer")
    with pytest.raises(UserError, match="divisible by 64"):
        pack(torch.randn(4, 48), "fp32")
    with pytest.raises(UserError, match="unknown weight kind"):
        pack(torch.randn(4, 64), "int3")


def test_pack_refuses_rows_wider_than_the_kernels_handle():
    with pytest.raises(UserError, match="at most 65536"):
        pack(torch.zeros(1, 65536 + 64), "int4")


def test_activation_quantizer_matches_reference_bit_for_bit():
    x = torch.randn(5, 256) * torch.logspace(-3, 3, 256)
    x[1] = 0  # an all-zero block gets scale 0
    q_ref, s_ref = quantize_activations(x)
    for isa in _isas():
        for t in range(x.shape[0]):
            q = torch.empty(256, dtype=torch.uint8)
            s = torch.empty(4)
            row = x[t].contiguous()
            native.lib().nmr_quantize(row.data_ptr(), 256, q.data_ptr(), s.data_ptr(), native.ISAS.index(isa))
            assert torch.equal(q.to(torch.int64) - 128, q_ref[t].to(torch.int64)), isa
            assert torch.equal(s, s_ref[t]), isa


def test_detect_nm_prefers_the_sparsest_pattern():
    assert detect_nm(_pruned(8, 64, NM(1, 4))) == NM(1, 4)
    assert detect_nm(_pruned(8, 64, NM(2, 4))) == NM(2, 4)
    assert detect_nm(_pruned(8, 64, NM(2, 8))) == NM(2, 8)
    assert detect_nm(torch.randn(8, 64)) is None


def _tiny_llama(pattern: NM | None = None, bias: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attention_bias=bias, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    if pattern is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                for mod in layer.modules():
                    if isinstance(mod, torch.nn.Linear):
                        mod.weight.mul_(nm_mask(mod.weight.abs(), pattern))
    return model


@pytest.mark.parametrize("pattern", [None, NM(2, 4), NM(1, 4)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_engine_fp32_matches_hf_logits(pattern, bias):
    model = _tiny_llama(pattern, bias)
    ids = torch.randint(0, 300, (1, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits[0]
    for isa in _isas():
        eng = Engine(model, weights="fp32", head="fp32", max_seq=64, threads=2, isa=isa)
        if pattern is not None:
            assert set(eng.info.patterns.values()) == {str(pattern), "dense"}  # dense: the head
        full = eng.forward(ids[0], all_logits=True)
        assert torch.allclose(full, ref, atol=1e-4, rtol=1e-4), isa
        eng.reset()  # the same tokens in three calls: the cache carries the context
        parts = [eng.forward(ids[0, :8], all_logits=True), eng.forward(ids[0, 8:9], all_logits=True),
                 eng.forward(ids[0, 9:], all_logits=True)]
        assert torch.allclose(torch.cat(parts), ref, atol=1e-4, rtol=1e-4), isa


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_engine_low_precision_stays_close(kind):
    model = _tiny_llama(NM(2, 4))
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0], -1)
    eng = Engine(model, weights=kind, max_seq=32, threads=1)
    out = torch.log_softmax(eng.forward(ids[0], all_logits=True), -1)
    # the KL divergence to the fp32 model stays small (a loose bound: random weights, 4 bits)
    kl = (ref.exp() * (ref - out)).sum(-1).mean()
    assert float(kl) < {"bf16": 1e-3, "int8": 1e-2, "int4": 0.2}[kind]


def test_engine_greedy_tokens_equal_hf_generate():
    model = _tiny_llama(NM(2, 4))
    prompt = [5, 17, 42, 99, 3]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                            pad_token_id=0)[0, len(prompt):].tolist()
    eng = Engine(model, weights="fp32", head="fp32", max_seq=64, threads=2)
    assert complete(eng, prompt, 24) == hf  # greedy decode runs through next_token
    eng.reset()  # next_token is forward + argmax, token for token
    token = int(eng.forward(prompt).argmax())
    by_forward = [token]
    for _ in range(8):
        token = int(eng.forward([token]).argmax())
        by_forward.append(token)
    eng.reset()
    token = int(eng.forward(prompt).argmax())
    by_step = [token]
    for _ in range(8):
        token = eng.next_token(token)
        by_step.append(token)
    assert by_step == by_forward == hf[:9]


def test_engine_refuses_bad_input():
    model = _tiny_llama()
    eng = Engine(model, weights="fp32", max_seq=8, threads=1)
    with pytest.raises(UserError, match="context full"):
        eng.forward(list(range(9)))
    with pytest.raises(UserError, match="out of range"):
        eng.forward([300])
    with pytest.raises(UserError, match="unknown --weights"):
        Engine(model, weights="fp8")
    with pytest.raises(UserError, match="at least one token"):
        eng.forward([])
    with pytest.raises(UserError, match="out of range"):
        eng.next_token(-1)
    eng.reset()
    eng.forward(list(range(8)))
    with pytest.raises(UserError, match="context full"):
        eng.next_token(1)


def test_engine_refuses_unsupported_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100)).eval()
    with pytest.raises(UserError, match="Llama-family"):
        Engine(model)


def test_struct_layout_matches_c():
    # the C side reads these offsets; a reordered field would silently misread pointers
    out = (ctypes.c_int64 * 4)()
    native.lib().nmr_layout(out)
    assert list(out) == [ctypes.sizeof(native.MatStruct), native.MatStruct.tiles.offset,
                         ctypes.sizeof(native.ModelStruct), native.ModelStruct.vcache.offset]


def test_engine_perplexity_equals_hf_perplexity():
    from nmkit.evaluate import perplexity_of_windows
    from nmkit.runtime.evaluate import window_nll

    model = _tiny_llama(NM(2, 4))
    windows = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(4))
    eng = Engine(model, weights="fp32", head="fp32", max_seq=64, threads=1)
    nll = sum(window_nll(eng, w) for w in windows) / (2 * 39)
    assert abs(nll - perplexity_of_windows(model, windows, progress=False)) < 1e-4
