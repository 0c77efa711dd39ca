"""Cost models: seconds one Linear layer takes for a batch of tokens under a pattern, on one device.

Every model answers ``cost(shape, batch, pattern, dtype)`` for a layer of ``shape`` = (out, in), a
pattern "dense" or "N:M" (keep N of every M), and ``overhead(model_shape, batch)``, the time of the
rest of one forward step (LM head, attention, norms), which a plan cannot change. The formulas of the
two modelled devices, their parameters and sources are in docs/plan.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from nmkit.patterns import NM

DENSE = "dense"
CANDIDATES = ("dense", "4:8", "2:4", "2:8", "1:4")


@dataclass(frozen=True)
class ModelShape:
    """What a cost model needs to know of a model: its planned layers' shapes and the LM head's."""

    layers: dict[str, tuple[int, int]]  # name -> (out, in), in module order
    head: tuple[int, int]  # (vocab, hidden)
    key: str = ""  # identifies the model's architecture (cache keys)


def density(pattern: str) -> float:
    return 1.0 if pattern == DENSE else NM.parse(pattern).density


def group(pattern: str) -> int:
    return 1 if pattern == DENSE else NM.parse(pattern).group


class CostModel(Protocol):
    name: str

    def supports(self, shape: tuple[int, int], pattern: str) -> bool: ...

    def cost(self, shape: tuple[int, int], batch: int, pattern: str, dtype: str | None = None) -> float: ...

    def overhead(self, model: ModelShape, batch: int, dtype: str | None = None) -> float: ...


def _roofline(flops: float, nbytes: float, flops_per_s: float, bytes_per_s: float) -> float:
    return max(flops / flops_per_s, nbytes / bytes_per_s)


@dataclass
class SparseTensorCoreGPU:
    """An NVIDIA GPU with sparse tensor cores: 2:4 runs on them, every other pattern runs dense.

    Per layer: launch latency + roofline of the GEMM. Dense: 2*B*out*in flops at ``peak_tflops`` x
    ``efficiency``; bytes are the fp16 weight plus activations. 2:4: the flops at twice the peak
    times ``sparse_efficiency`` (the fraction of the 2x that shipped kernels attain); of the bytes 2:4
    could save (half the values, plus 2 bits of metadata per kept value), ``sparse_bytes_gain`` is
    realised: shipped kernels pad small batches to full tiles, so at decode they read about what dense
    reads (gain 0, the published batch-1 figure in docs/plan.md).
    """

    name: str
    peak_tflops: float  # dense fp16 tensor-core peak
    mem_gbps: float
    efficiency: float = 0.7  # fraction of the dense peak a GEMM reaches
    sparse_efficiency: float = 0.65  # fraction of the ideal 2x that the 2:4 kernels reach (compute side)
    sparse_bytes_gain: float = 0.0  # fraction of the ideal byte saving realised (memory-bound side)
    bw_efficiency: float = 0.8  # fraction of memory bandwidth reached
    launch_us: float = 4.0
    dtype_bytes: int = 2
    patterns: tuple[str, ...] = ("dense", "2:4")

    def supports(self, shape: tuple[int, int], pattern: str) -> bool:
        return pattern == DENSE or (pattern == "2:4" and shape[1] % 4 == 0)

    def cost(self, shape: tuple[int, int], batch: int, pattern: str, dtype: str | None = None) -> float:
        out, inp = shape
        flops = 2.0 * batch * out * inp
        acts = batch * (out + inp) * self.dtype_bytes
        peak = self.peak_tflops * 1e12 * self.efficiency
        bw = self.mem_gbps * 1e9 * self.bw_efficiency
        dense_weights = out * inp * self.dtype_bytes
        if pattern == "2:4":
            ideal = out * inp * 0.5 * self.dtype_bytes + out * inp * 0.5 * 2 / 8  # values + 2-bit indices
            weights = dense_weights - self.sparse_bytes_gain * (dense_weights - ideal)
            t = _roofline(flops, weights + acts, peak * 2 * self.sparse_efficiency, bw)  # dense-equivalent flops
        else:  # dense, and the dense fallback of every other pattern
            t = _roofline(flops, dense_weights + acts, peak, bw)
        return self.launch_us * 1e-6 + t

    def overhead(self, model: ModelShape, batch: int, dtype: str | None = None) -> float:
        return self.cost(model.head, batch, DENSE, dtype)


@dataclass
class NMAccelerator:
    """An N:M accelerator in the style of STA / SAT: a MAC array fed only the kept weights through
    N:M decoders, weights streamed from DRAM with ceil(log2 M) index bits per kept value.

    Per layer: ``latency_cycles`` + max(compute, memory). Compute: B*out*in*N/M MACs over ``macs``
    MAC units at ``freq_mhz`` (dense: N/M = 1). Memory: kept values at ``value_bits`` plus indices plus
    activations over ``dram_gbps``. ``buffer_kib``: the on-chip activation buffer; a batch whose input
    and output activations do not fit is run in tiles that do, and the weights stream once per tile.
    """

    name: str
    macs: int
    freq_mhz: float
    dram_gbps: float
    buffer_kib: float
    value_bits: int = 16
    latency_cycles: int = 100
    patterns: tuple[str, ...] = ("dense", "2:4", "1:4", "2:8", "4:8")

    def supports(self, shape: tuple[int, int], pattern: str) -> bool:
        out, inp = shape
        one_token = (out + inp) * self.value_bits / 8
        return pattern in self.patterns and inp % group(pattern) == 0 and one_token <= self.buffer_kib * 1024

    def cost(self, shape: tuple[int, int], batch: int, pattern: str, dtype: str | None = None) -> float:
        out, inp = shape
        d = density(pattern)
        index_bits = 0 if pattern == DENSE else math.ceil(math.log2(group(pattern)))
        kept = out * inp * d
        macs = batch * kept
        acts = batch * (out + inp) * self.value_bits / 8
        tiles = math.ceil(acts / (self.buffer_kib * 1024))
        nbytes = tiles * kept * (self.value_bits + index_bits) / 8 + acts
        hz = self.freq_mhz * 1e6
        return self.latency_cycles / hz + _roofline(macs, nbytes, self.macs * hz, self.dram_gbps * 1e9)

    def overhead(self, model: ModelShape, batch: int, dtype: str | None = None) -> float:
        return self.cost(model.head, batch, DENSE, dtype)


def step_seconds(model: CostModel, shape: ModelShape, plan: dict[str, str], batch: int,
                 dtype: str | None = None) -> float:
    """Predicted seconds of one forward step of ``batch`` tokens with ``plan`` (layer -> pattern)."""
    layers = sum(model.cost(s, batch, plan.get(n, DENSE), dtype) for n, s in shape.layers.items())
    return model.overhead(shape, batch, dtype) + layers
