"""release_mapped: drops the pages of tensors read from a mapped safetensors file, never changes data,
and leaves anonymous memory alone."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nmkit.formats.mapped import ReleaseQueue, release_mapped

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux mappings")


def _rss_file_kib() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["RssFile"].split()[0])


def test_release_drops_mapped_pages_and_keeps_values(tmp_path):
    torch.manual_seed(0)
    stored = {"a": torch.randn(1024, 1024), "b": torch.randn(7, 3)}
    save_file(stored, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt", device="cpu") as f:
        a, b = f.get_slice("a")[...], f.get_slice("b")[...]
        assert torch.equal(a, stored["a"])  # faults every page of `a` in
        before = _rss_file_kib()
        released = release_mapped([a, b])
        assert released > 4 * 2**20 - 2 * 4096 - 1  # whole pages inside `a` (4 MiB); `b` is under a page
        assert _rss_file_kib() < before - 3 * 1024
        assert torch.equal(a, stored["a"]) and torch.equal(b, stored["b"])  # read again from the file


def test_release_leaves_anonymous_memory_alone():
    t = torch.randn(1024, 1024)
    copy = t.clone()
    assert release_mapped([t, t[:, ::2], torch.empty(0), None]) == 0
    assert torch.equal(t, copy)


def test_release_queue_releases_in_batches_and_on_flush(tmp_path):
    stored = {f"t{i}": torch.full((256, 1024), float(i)) for i in range(3)}  # 1 MiB each
    save_file(stored, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt", device="cpu") as f:
        views = {k: f.get_slice(k)[...] for k in stored}
        queue = ReleaseQueue(batch_bytes=2 * 2**20)
        queue.add([views["t0"]])
        assert queue.released == 0 and len(queue.pending) == 1  # below the batch: held, not yet released
        queue.add([views["t1"], None])
        assert queue.released > 0 and not queue.pending  # the batch is full: both released
        queue.add([views["t2"]])
        queue.flush()
        assert queue.released > 2 * 2**20 and not queue.pending
        assert all(torch.equal(views[k], stored[k]) for k in stored)
