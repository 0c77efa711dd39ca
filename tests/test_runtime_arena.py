"""The decode arena: copies are bit-exact, aligned for the kernels, and it works without huge pages."""

from __future__ import annotations

import mmap

import pytest
import torch

from nmkit.runtime import arena as arena_mod
from nmkit.runtime.arena import Arena, nbytes


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 5, generator=g), torch.randint(-128, 127, (77,), generator=g).to(torch.int8),
            torch.randn(9, generator=g).to(torch.bfloat16), torch.randn(4, 4, generator=g).to(torch.float16)]


def test_place_copies_bit_for_bit_at_aligned_addresses():
    ts = _tensors()
    a = Arena([nbytes(t) for t in ts] + [4 * 10])
    placed = [a.place(t) for t in ts]
    for t, p in zip(ts, placed, strict=True):
        assert p.dtype == t.dtype and p.shape == t.shape
        assert torch.equal(p.view(torch.uint8) if p.dim() else p, t.view(torch.uint8) if t.dim() else t)
        assert p.data_ptr() % 64 == 0
    z = a.zeros(10)
    assert z.data_ptr() % 64 == 0 and not bool(z.any())
    assert placed[0].data_ptr() % arena_mod.HUGE_PAGE == 0  # the first tensor starts a 2 MiB page


def test_arena_refuses_more_than_it_was_sized_for():
    a = Arena([64])
    a.place(torch.zeros(16))
    with pytest.raises(RuntimeError, match="too small"):
        a.place(torch.zeros(1))


def test_arena_works_without_huge_page_advice(monkeypatch):
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    t = torch.arange(100, dtype=torch.float32)
    a = Arena([nbytes(t)])
    assert not a.huge_pages
    assert torch.equal(a.place(t), t)
