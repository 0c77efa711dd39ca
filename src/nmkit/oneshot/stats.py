"""Calibration statistics of each layer's input: X^T X (sum over tokens) and the token count.

Layers that read the same tensor (q/k/v, gate/up) share one accumulator, so each distinct input
costs one GEMM per calibration sample. Each sample's X^T X is a float32 GEMM; the sum over samples
(and over ranks, :mod:`nmkit.oneshot.distributed`) is kept in float64, where it is all but exact:
summed in another order (one process, or each rank's share then an all-reduce; batches of any size)
it rounds the same, so a distributed run solves with the statistics of one process. Summed in float32
the two differ by ~1e-7, enough to flip a few of SparseGPT's near-tied N:M choices, which then change
every later block's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmkit.oneshot.targets import Target


@dataclass
class InputStats:
    xtx: torch.Tensor  # (in, in) sum over calibration tokens of x x^T, float64 when collected here
    tokens: int = 0
    # (in, bins) histogram of each input channel's values over [-range, range] (E-Sparse's entropy).
    histogram: torch.Tensor | None = None
    hist_range: torch.Tensor | None = None

    def entropy(self) -> torch.Tensor:
        """Shannon entropy (nats) of each input channel's value histogram."""
        if self.histogram is None:
            raise RuntimeError("no histograms were collected (StatsCollector(histogram_bins=...))")
        p = self.histogram / self.histogram.sum(1, keepdim=True).clamp(min=1)
        return -(p * p.clamp(min=1e-30).log()).sum(1)

    @property
    def sq_norms(self) -> torch.Tensor:
        """||X_j||^2 per input channel (Wanda's statistic)."""
        return self.xtx.diagonal()


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    # Rows are tokens, columns are the layer's input features.
    return x.reshape(-1, x.shape[-1]).float()


def _per_sample(rows: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``rows`` split by calibration sample (the first dimension of a batched ``x``; a 2-D ``x`` is one).

    X^T X is summed one sample at a time so that its float32 GEMMs are the same however the samples
    are batched or shared out across ranks; only the float64 sum's order changes.
    """
    return rows.chunk(x.shape[0]) if x.dim() > 2 else (rows,)


class StatsCollector:
    """Forward hooks that accumulate :class:`InputStats` for a set of targets while active."""

    def __init__(self, targets: list[Target], histogram_bins: int = 0):
        self.targets = targets
        self.histogram_bins = histogram_bins
        self.stats: dict[str, InputStats] = {}
        # id(input) -> (input, stats); holding the tensor keeps its id from being reused this batch.
        self._seen: dict[int, tuple[torch.Tensor, InputStats]] = {}
        self._handles: list = []

    def __enter__(self) -> StatsCollector:
        for target in self.targets:
            self._handles.append(target.module.register_forward_hook(self._hook(target)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self) -> None:
        """Forget which tensors were already counted (call before each forward)."""
        self._seen.clear()

    def _hook(self, target: Target):
        def hook(module, args, output):
            x = args[0]
            if id(x) in self._seen:  # same input as a sibling layer in this forward: share its stats
                self.stats.setdefault(target.name, self._seen[id(x)][1])
                return
            rows = _as_rows(x.detach())
            stats = self.stats.get(target.name)
            if stats is None:
                stats = InputStats(torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=x.device))
                self.stats[target.name] = stats
            for sample in _per_sample(rows, x):  # a float32 GEMM per sample, summed in float64
                stats.xtx.add_(sample.T @ sample)
            stats.tokens += rows.shape[0]
            if self.histogram_bins:
                _add_histogram(stats, rows, self.histogram_bins)
            self._seen[id(x)] = (x, stats)

        return hook


def collect_block_stats(block, targets: list[Target], hidden: torch.Tensor, kwargs: dict, batch: int,
                        histogram_bins: int = 0) -> dict[str, InputStats]:
    """Run ``block`` over ``hidden`` in batches of ``batch`` rows and return the input statistics of
    ``targets`` (modules inside it)."""
    with StatsCollector(targets, histogram_bins=histogram_bins) as collector:
        for s in range(0, hidden.shape[0], batch):
            collector.new_batch()
            block(hidden[s : s + batch], **kwargs)
    return collector.stats


def _add_histogram(stats: InputStats, rows: torch.Tensor, bins: int) -> None:
    """Per-channel value histograms. Each channel's range is fixed from the first batch (4x its max
    |x|, so later batches rarely clip; clipped values land in the edge bins)."""
    if stats.histogram is None:
        stats.hist_range = rows.abs().amax(0).clamp(min=1e-6) * 4
        stats.histogram = torch.zeros(rows.shape[1], bins, dtype=torch.float64, device=rows.device)
    r = stats.hist_range
    index = ((rows.clamp(-r, r) + r) / (2 * r) * bins).long().clamp(max=bins - 1)
    flat = index + torch.arange(rows.shape[1], device=rows.device) * bins
    counts = torch.bincount(flat.reshape(-1), minlength=rows.shape[1] * bins)
    stats.histogram += counts.reshape(rows.shape[1], bins)
