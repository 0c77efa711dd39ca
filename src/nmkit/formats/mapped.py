"""Give back the resident pages of a tensor read from a memory-mapped checkpoint once it has been copied.

transformers maps each safetensors file and hands out tensors that are views of the mapping. A
compressed layer is read once and regrouped into the kernel layout (a copy); the pages it was read
from stay resident, and counted in the process's memory, until the whole file is unmapped at the end
of loading, although nothing reads them again. :func:`release_mapped` drops them (``madvise
MADV_DONTNEED``) right after the copy. For a file mapping this changes no data: a later read of the
same bytes faults them in again from the file. It acts only on whole pages inside the tensor and
only where ``/proc/self/maps`` shows a ``.safetensors`` file mapped there, so anonymous memory (a
tensor that was already a copy) is never touched. Elsewhere (no /proc, not Linux) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os

import torch

_MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise():
    if not os.path.exists("/proc/self/maps"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges where a ``.safetensors`` file is mapped in this process."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n").endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def release_mapped(tensors: list[torch.Tensor]) -> int:
    """Drop the resident pages of ``tensors`` that are views of a mapped ``.safetensors`` file; the
    bytes released (whole pages inside each tensor only). Call once their data has been copied."""
    madvise = _madvise()
    tensors = [t for t in tensors if t is not None and t.device.type == "cpu" and t.numel() and t.is_contiguous()]
    if madvise is None or not tensors:
        return 0
    ranges = _safetensors_mappings()
    page = mmap.PAGESIZE
    released = 0
    for t in tensors:
        begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if not any(lo <= begin and end <= hi for lo, hi in ranges):
            continue
        first, last = -(-begin // page) * page, end // page * page
        if last > first and madvise(first, last - first, _MADV_DONTNEED) == 0:
            released += last - first
    return released


class ReleaseQueue:
    """:func:`release_mapped` in batches, so a loader reads ``/proc/self/maps`` once per ``batch_bytes``
    of tensors rather than once per layer. Queued tensors stay referenced until released, so their
    mapping cannot go away (and its addresses be reused) in between."""

    def __init__(self, batch_bytes: int = 32 * 2**20) -> None:
        self.batch_bytes = batch_bytes
        self.pending: list[torch.Tensor] = []
        self.pending_bytes = 0
        self.released = 0

    def add(self, tensors: list[torch.Tensor | None]) -> None:
        for t in tensors:
            if t is not None:
                self.pending.append(t)
                self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        self.released += release_mapped(self.pending)
        self.pending, self.pending_bytes = [], 0


__all__ = ["ReleaseQueue", "release_mapped"]
