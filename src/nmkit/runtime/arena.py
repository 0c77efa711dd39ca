"""The memory a decode step streams, placed where the OS can back it with 2 MiB pages.

A decode step reads every packed weight once. With 4 KiB pages each page costs a TLB miss and the
hardware prefetchers stop at every page boundary, so one core streams far below what the memory
delivers: on the benchmark machine a 75 MB tiled 2:4 matrix read at 18-20 GB/s from 4 KiB pages and
at 31-38 GB/s from 2 MiB pages (one thread). Linux's transparent huge pages are often in ``madvise``
mode, which backs only memory that asks, so the engine copies its weights and KV cache into one
anonymous mapping that asks (``MADV_HUGEPAGE``). Where the OS has no such advice, or refuses it, the
mapping is ordinary memory and everything works the same, only slower.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64  # the kernels' vector loads


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Arena:
    """One anonymous mapping of ``sizes`` bytes (each rounded up to 64) that :meth:`place` copies tensors
    into and :meth:`zeros` carves zero tensors from, in that order. The arena must outlive them (the
    engine keeps it)."""

    def __init__(self, sizes: list[int]) -> None:
        self.nbytes = sum(_aligned(n) for n in sizes)
        # private: anonymous *shared* memory is shmem, whose huge pages follow a separate, usually off, switch
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        size = self.nbytes + HUGE_PAGE  # + slack to start at a 2 MiB boundary
        self._map = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
        self.huge_pages = False
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            try:
                self._map.madvise(advice)
                self.huge_pages = True
            except OSError:  # THP disabled or not supported: ordinary pages
                pass
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._next = (-self._bytes.data_ptr()) % HUGE_PAGE
        self._end = self._next + self.nbytes

    def _take(self, n: int) -> torch.Tensor:
        if self._next + n > self._end:
            raise RuntimeError("arena too small for what is placed in it")
        out = self._bytes[self._next : self._next + n]
        self._next += _aligned(n)
        return out

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` (contiguous, same dtype and shape) inside the arena."""
        out = self._take(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        out.copy_(t)
        return out

    def zeros(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zero tensor of ``numel`` elements inside the arena (the mapping starts zeroed)."""
        return self._take(numel * dtype.itemsize).view(dtype)


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
