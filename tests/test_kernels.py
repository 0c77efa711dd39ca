"""Every native kernel path (each ISA this machine has, GEMV and SpMM) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from nmkit import clib
from nmkit.formats import compress, to_blocked
from nmkit.kernels import cuda, native, nm_linear, reference
from nmkit.solvers.nm import nm_mask

ISAS = native.supported_isas()
needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built")


def _case(rows, cols, pattern, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w = (w * nm_mask(w.abs(), pattern)).to(dtype)
    return w, compress(w, pattern)


TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "2:8", "1:8", "4:8", "1:16", "4:16", "8:16"])
def test_kernel_matches_reference(isa, dtype, pattern):
    _, t = _case(37, 96, pattern, dtype)  # odd rows (row padding) and in % 32 != 0 (column padding)
    b = to_blocked(t)
    for batch in (1, 2, 3, 4, 5, 8, 16, 17, 64, 65):
        x = torch.randn(batch, 96).to(dtype)
        ref = reference.nm_linear_fp32(x, t)
        for kind in ("auto", "gemv", "spmm", "gather", "pair"):  # a kind a path lacks falls back to the SpMM
            y = native.linear(x, b, isa=isa, kind=kind).float()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            assert err < TOL[dtype], (isa, kind, batch, err)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("dtype", "pattern", "rows", "cols", "batches", "kinds"), [
    # bf16 gather kernel: several 512-column tiles plus a lone last 32-column unit, row-block groups
    # of 4 with a partial last group, 1-4 tokens per register tile
    (torch.bfloat16, "2:4", 45, 1056, (1, 2, 5, 16, 33), ("auto", "gather")),
    (torch.bfloat16, "4:8", 45, 1056, (3, 16), ("auto", "gather")),
    # bf16 2:4 pair-table kernel: more than one 256-row group with a partial last 4-row block, column
    # tiles with a partial last one (12 units at 16 tokens, 3 at 64), 1-4 token vectors with partial
    # last vectors, several token chunks (65: 48 + 17; 129: 3 x 43)
    (torch.bfloat16, "2:4", 301, 1000, (1, 3, 13, 17, 33, 63, 64, 65, 129), ("auto", "pair")),
    (torch.bfloat16, "2:4", 7, 32, (16, 50), ("pair",)),
    # fp32 GEMV in column tiles (4-row-block groups, partial sums between tiles), every load width
    (torch.float32, "2:4", 45, 1056, (2, 4, 7, 16), ("auto", "gemv")),
    (torch.float32, "2:8", 45, 1056, (4, 16), ("gemv",)),
    (torch.float32, "3:4", 45, 1056, (5, 16), ("gemv",)),
    # fp32 SpMM whose XT outgrows L2 (2624 x 64 tokens x 4 B > 640 KB): k-blocked, rows in groups
    (torch.float32, "2:4", 70, 2600, (64, 65), ("spmm",)),
    (torch.float32, "1:4", 70, 2600, (40,), ("auto", "spmm")),
])
def test_kernel_tiling(isa, dtype, pattern, rows, cols, batches, kinds):
    _, t = _case(rows, cols, pattern, dtype, seed=1)
    b = to_blocked(t)
    for batch in batches:
        x = torch.randn(batch, cols).to(dtype)
        ref = reference.nm_linear_fp32(x, t)
        for kind in kinds:
            y = native.linear(x, b, isa=isa, kind=kind).float()
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            assert err < TOL[dtype], (isa, kind, batch, err)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_env_var_forces_isa(isa, monkeypatch):
    monkeypatch.setenv("NMKIT_ISA", isa)
    clib.reset()  # the environment is read once per process; re-read it (and again after the test)
    try:
        assert native._resolve_isa(None) == native.ISAS.index(isa)
        _, t = _case(8, 64, "2:4", torch.float32)
        x = torch.randn(2, 64)
        torch.testing.assert_close(native.linear(x, to_blocked(t)), reference.nm_linear(x, t),
                                   rtol=1e-5, atol=1e-5)
    finally:
        clib.reset()


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_and_3d_input(threads):
    _, t = _case(300, 4096, "2:4", torch.float32)  # large enough to split across threads
    x = torch.randn(2, 3, 4096)
    y = native.linear(x, to_blocked(t), threads=threads)
    ref = reference.nm_linear(x, t)
    assert y.shape == ref.shape  # outputs ~50: accumulation order alone moves elements by ~2e-4
    assert ((y - ref).abs().max() / ref.abs().max()).item() < TOL[torch.float32]
    _, t = _case(300, 2048, "2:4", torch.bfloat16)
    for lead in ((2, 8), (2, 40)):  # gather kernel (per-thread scratch); pair kernel (shared table, 2 chunks)
        x = torch.randn(*lead, 2048).to(torch.bfloat16)
        ref = reference.nm_linear_fp32(x, t)
        y = native.linear(x, to_blocked(t), threads=threads).float()
        assert ((y - ref).abs().max() / ref.abs().max()).item() < TOL[torch.bfloat16]


@needs_native
def test_noncontiguous_input():
    _, t = _case(16, 64, "2:4", torch.float32)
    x = torch.randn(64, 5).T  # stride (1, 5)
    torch.testing.assert_close(native.linear(x, to_blocked(t)), reference.nm_linear(x, t),
                               rtol=1e-5, atol=1e-5)


def test_dispatch_falls_back_to_reference(monkeypatch):
    # fp16 has no native kernel, and a canonical (not blocked) weight always runs on the reference.
    w, t = _case(8, 64, "2:4", torch.float16)
    x = torch.randn(3, 64).half()
    torch.testing.assert_close(nm_linear(x, to_blocked(t)), torch.nn.functional.linear(x, w))
    w, t = _case(8, 64, "2:4", torch.float32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(nm_linear(x, t), torch.nn.functional.linear(x, w))


def test_without_native_library(monkeypatch):
    monkeypatch.setattr(native, "_lib", lambda: None)
    assert not native.available() and native.supported_isas() == []
    w, t = _case(8, 64, "2:4", torch.float32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(nm_linear(x, to_blocked(t)), torch.nn.functional.linear(x, w))


def test_cuda_module_imports_and_skips_cleanly():
    if not cuda.available():
        with pytest.raises(RuntimeError, match="GPU"):
            cuda.SemiStructuredLinear.from_dense(torch.nn.Linear(64, 64).half())
        pytest.skip("no CUDA GPU with compute capability >= 8.0")
    lin = torch.nn.Linear(200, 72).half().cuda()  # not multiples of 64: exercises the padding
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs(), "2:4"))
    s = cuda.SemiStructuredLinear.from_dense(lin)
    x = torch.randn(5, 200, dtype=torch.half, device="cuda")
    torch.testing.assert_close(s(x), lin(x), rtol=2e-2, atol=2e-2)


def test_nm_linear_reaches_cuda_for_gpu_2_4():
    """nm_linear is the one dispatch point: a GPU fp16 2:4 weight runs the semi-structured path."""
    w, t = _case(72, 192, "2:4", torch.float16)
    assert not cuda.supports(t, torch.randn(2, 192, dtype=torch.float16))  # CPU input: never CUDA
    if not cuda.available():
        pytest.skip("no CUDA GPU with compute capability >= 8.0")
    t_gpu = type(t)(values=t.values.cuda(), mask=t.mask.cuda(), shape=t.shape, pattern=t.pattern)
    x = torch.randn(5, 192, dtype=torch.float16, device="cuda")
    assert cuda.supports(t_gpu, x)
    torch.testing.assert_close(nm_linear(x, t_gpu), torch.nn.functional.linear(x, w.cuda()), rtol=2e-2, atol=2e-2)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:16"])
def test_native_decompress_exact(isa, dtype, pattern):
    w, t = _case(37, 96, pattern, dtype)
    assert torch.equal(native.decompress(to_blocked(t), isa=isa), w)
