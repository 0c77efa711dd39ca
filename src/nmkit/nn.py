"""SparseLinear (a Linear whose weight is stored compressed N:M) and ``compress(model)``.

``compress`` swaps pruned ``nn.Linear`` layers for :class:`SparseLinear` where a short measurement
on this machine says the sparse kernel is faster, and returns a report of what it changed. The
kernel runs as the ``nmkit::nm_linear`` custom op, so it works under ``torch.compile`` (fake impl
below), ``torch.inference_mode`` and HF ``generate``. Inference only: there is no backward.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nmkit.formats.blocked import BlockedNM, from_blocked, to_blocked, zeros_blocked
from nmkit.formats.nm import NMTensor
from nmkit.formats.nm import compress as compress_tensor
from nmkit.kernels import dense_weight, nm_linear
from nmkit.patterns import NM, PatternError, group_counts
from nmkit.selection import selected


@torch.library.custom_op("nmkit::nm_linear", mutates_args=())
def _nm_linear_op(
    x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, out_features: int, in_features: int,
    keep: int, group: int,
) -> torch.Tensor:
    weight = BlockedNM(values=values, mask=mask, shape=(out_features, in_features), pattern=NM(keep, group))
    return nm_linear(x, weight)


@_nm_linear_op.register_fake
def _(x, values, mask, out_features, in_features, keep, group):
    return x.new_empty(*x.shape[:-1], out_features)


def _auto_dense_from(pattern: NM, dtype: torch.dtype) -> int | None:
    """Batch from which dense bf16 ``F.linear`` wins by default (see :class:`SparseLinear`)."""
    if dtype != torch.bfloat16:
        return None
    return 128 if (pattern.keep, pattern.group) == (2, 4) else 32


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with W kept as N:M values + bitmask in the kernel layout.

    ``dense_from_batch``: at this many tokens or more, decompress (one native pass) and use dense
    ``F.linear``. :func:`compress` sets it from its measurement. ``"auto"`` means never for fp32,
    128 for bf16 2:4 and 32 for other bf16 patterns. Those are where torch's bf16 GEMM overtook our
    bf16 kernels on the development machine (1 thread). 2:4 has the pair-table kernel: 1.3x at 64
    tokens on 4096x4096, 0.9-1.0x at 128 on SmolLM2's layers. Other patterns have the gather or
    GEMV kernel: 4096x4096 4:8 went from 1.3x at 16 tokens to 0.85x at 64.
    """

    def __init__(self, in_features: int, out_features: int, pattern: NM | str, bias: bool = True,
                 dtype: torch.dtype = torch.float32, dense_from_batch: int | None | str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.pattern = NM.parse(pattern)
        if dense_from_batch == "auto":
            dense_from_batch = _auto_dense_from(self.pattern, dtype)
        self.dense_from_batch = dense_from_batch
        shell = zeros_blocked((out_features, in_features), self.pattern, dtype=dtype)
        self.register_buffer("values", shell.values)
        self.register_buffer("mask", shell.mask)
        bias_t = torch.zeros(out_features, dtype=dtype)
        self.bias = nn.Parameter(bias_t, requires_grad=False) if bias else None
        # Optional dense copy for the large-batch fallback (compress(..., fallback="keep")): no
        # decompression per call, at the cost of the dense weight's memory. Not saved.
        self.register_buffer("dense_weight", None, persistent=False)

    @classmethod
    def from_dense(cls, linear: nn.Linear, pattern: NM | str, mask: torch.Tensor | None = None,
                   dense_from_batch: int | None | str = "auto") -> SparseLinear:
        """Compress a pruned ``nn.Linear`` (its weight must follow ``pattern``: keep N of every M)."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, pattern, bias=linear.bias is not None,
                  dtype=w.dtype, dense_from_batch=dense_from_batch)
        mod.load_compressed(compress_tensor(w.cpu(), pattern, mask))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod.to(w.device)

    def load_compressed(self, t: NMTensor) -> None:
        """Replace the weight with a canonical compressed tensor of the same shape and pattern."""
        if tuple(t.shape) != (self.out_features, self.in_features) or t.pattern != self.pattern:
            raise PatternError(f"compressed weight {t.shape} {t.pattern} does not fit {self}")
        b = to_blocked(t)
        self.values = b.values
        self.mask = b.mask

    def compressed(self) -> NMTensor:
        """The weight in the canonical (row-major) compressed layout, e.g. for saving."""
        return from_blocked(self._blocked())

    def _blocked(self) -> BlockedNM:
        return BlockedNM(values=self.values, mask=self.mask, shape=(self.out_features, self.in_features),
                         pattern=self.pattern)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, decompressed on demand (forward builds it only for the dense fallback)."""
        return dense_weight(self._blocked())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(1, self.in_features)
        if self.dense_from_batch is not None and tokens >= self.dense_from_batch:
            dense = self.dense_weight if self.dense_weight is not None else self.weight
            return F.linear(x, dense.to(x.dtype), self.bias)
        if torch.compiler.is_compiling():
            y = _nm_linear_op(x, self.values, self.mask, self.out_features, self.in_features,
                              self.pattern.keep, self.pattern.group)
        else:  # same kernel without the custom-op dispatch cost (~10 us per call)
            y = nm_linear(x, self._blocked())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        extra = f", dense_from_batch={self.dense_from_batch}" if self.dense_from_batch else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"bias={self.bias is not None}, dtype={self.values.dtype}{extra}")


def detect_pattern(weight: torch.Tensor, groups: tuple[int, ...] = (4, 8, 16)) -> NM | None:
    """The sparsest N:M (M in ``groups``) the weight already follows, or None; ties prefer smaller M."""
    best: NM | None = None
    nonzero = weight.detach() != 0
    for m in groups:
        if weight.shape[-1] % m:
            continue
        counts = group_counts(nonzero, m)
        keep = max(1, int(counts.max()))
        if keep >= m:
            continue
        if best is None or keep / m < best.density:
            best = NM(keep, m)
    return best


@dataclass
class LayerChoice:
    """What :func:`compress` decided for one Linear layer and why."""

    name: str
    shape: tuple[int, int]
    pattern: str | None
    choice: str  # "sparse" or "dense"
    reason: str
    ratios: dict[int, float] = field(default_factory=dict)  # batch -> dense time / sparse time
    dense_from_batch: int | None = None


@dataclass
class CompressReport:
    layers: list[LayerChoice]

    @property
    def changed(self) -> list[str]:
        return [x.name for x in self.layers if x.choice == "sparse"]

    def __str__(self) -> str:
        lines = [f"nmkit.compress: {len(self.changed)} of {len(self.layers)} Linear layers now SparseLinear"]
        for x in self.layers:
            r = " ".join(f"B{b}:{v:.2f}x" for b, v in x.ratios.items())
            lines.append(f"  {x.name:<40} {x.choice:<6} {x.pattern or '-':<5} {r}  {x.reason}")
        return "\n".join(lines)


def _time_rotation(fn, items, x: torch.Tensor) -> float:
    """Seconds per call of ``fn(item, x)`` over the rotation (each item once).

    On one thread this is the thread's CPU time, which leaves out time lost to other processes;
    with more threads it is wall time.
    """
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    t0 = clock()
    for it in items:
        fn(it, x)
    return (clock() - t0) / len(items)


def _measure(
    dense: nn.Linear, sparse: SparseLinear, batches: tuple[int, ...], rounds: int, cold_mb: int = 48,
    cold_upto: int = 16,
) -> dict[int, float]:
    """Ratio dense / sparse time per batch size (best of ``rounds``, interleaved), on this machine.

    Up to ``cold_upto`` tokens each call uses the next of several copies of the weights (about
    ``cold_mb`` per method, more than the L3 of the development machine), because in a model the
    other layers evict a layer's weights between its calls and small batches are bound by reading
    them; larger batches are compute bound and are timed on one (hot) copy.
    """
    ratios = {}
    nbytes = dense.weight.numel() * dense.weight.element_size()
    copies = max(1, min(256, (cold_mb << 20) // max(1, nbytes)))
    w, bias = dense.weight.detach(), None if dense.bias is None else dense.bias.detach()
    d_items = [(w.clone(), bias) for _ in range(copies)]
    s_items = [copy.deepcopy(sparse) for _ in range(copies)]
    for m in s_items:
        m.dense_from_batch = None  # time the kernel itself at every batch

    def run_dense(item, x):
        return F.linear(x, item[0], item[1])

    def run_sparse(item, x):
        return item(x)

    with torch.inference_mode():
        for b in batches:
            n = copies if b <= cold_upto else 1
            x = torch.randn(b, dense.in_features, dtype=w.dtype, device=w.device)
            _time_rotation(run_dense, d_items[:2], x), _time_rotation(run_sparse, s_items[:2], x)
            td, ts = [], []
            for r in range(rounds):
                pair = [(td, run_dense, d_items[:n]), (ts, run_sparse, s_items[:n])]
                for acc, fn, items in pair if r % 2 == 0 else pair[::-1]:
                    acc.append(_time_rotation(fn, items, x))
            # Best round of each: on a shared machine other jobs only ever add time.
            ratios[b] = min(td) / min(ts)
    return ratios


def _targets(model: nn.Module, include, exclude) -> list[tuple[str, nn.Linear]]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    out = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if not selected(name, include, exclude):
            continue
        if seen.get(id(mod.weight), 0) > 1:  # tied (e.g. lm_head = embeddings): leave it alone
            continue
        out.append((name, mod))
    return out


def compress(
    model: nn.Module,
    pattern: NM | str | None = None,
    *,
    measure: bool = True,
    batches: tuple[int, ...] = (1, 4, 16, 64, 256),
    rounds: int = 5,
    cold_mb: int = 48,
    fallback: str = "keep",
    include: list[str] | None = None,
    exclude: tuple[str, ...] = ("*lm_head*",),
    verbose: bool = False,
) -> CompressReport:
    """Swap pruned ``nn.Linear`` layers for :class:`SparseLinear`, in place; returns what it did.

    ``pattern``: the N:M pattern the layers follow (keep N of every M); None detects it per layer
    (the sparsest N:M with M in 4, 8, 16 that the weight already satisfies). With ``measure`` each
    distinct (shape, pattern, dtype) is timed once against dense ``F.linear`` at ``batches`` tokens
    (up to 16 tokens on ``cold_mb`` of rotating weight copies). A layer stays dense when sparse is
    slower at the smallest batch; otherwise it gets ``dense_from_batch``, the batch from which
    dense won at every larger measured size (there it decompresses and runs dense). Without
    ``measure`` every valid layer is swapped. ``fallback="keep"`` (default) keeps a dense copy of
    the weight in layers that fall back, so large batches run at dense speed, at the cost of that
    memory (in practice: bf16 layers at large batches, e.g. SmolLM2's 2:4 layers from ~128
    tokens). ``"decompress"`` keeps only the compressed weight and decompresses per call: measured
    1.5-2x slower than dense on SmolLM2-sized layers and up to 8x on an 11008x4096 layer (page
    faults on a fresh 90 MB buffer).
    """
    if fallback not in ("decompress", "keep"):
        raise ValueError(f"fallback must be 'decompress' or 'keep', got {fallback!r}")
    fixed = NM.parse(pattern) if pattern is not None else None
    choices = []
    measured: dict[tuple, dict[int, float]] = {}  # kernel speed depends on shape, not on the values
    for name, lin in _targets(model, include, exclude):
        shape = (lin.out_features, lin.in_features)
        pat = fixed or detect_pattern(lin.weight)
        if pat is None or not pat.is_valid(lin.weight.detach() != 0):
            why = "weight is not N:M sparse" if pat is None else f"weight does not follow {pat}"
            choices.append(LayerChoice(name, shape, None if pat is None else str(pat), "dense", why))
            continue
        sparse = SparseLinear.from_dense(lin, pat)
        ratios, dense_from = {}, None
        if measure:
            key = (shape, str(pat), lin.weight.dtype, lin.bias is not None)
            if key not in measured:
                measured[key] = _measure(lin, sparse, tuple(sorted(batches)), rounds, cold_mb)
            ratios = measured[key]
            slower = [b for b, v in ratios.items() if v < 1.0]
            if slower and slower[0] == min(ratios):
                choices.append(LayerChoice(name, shape, str(pat), "dense",
                                           f"sparse slower at batch {slower[0]}", ratios))
                continue
            dense_from = None  # the smallest batch from which dense wins at every measured size
            for b in sorted(ratios, reverse=True):
                if ratios[b] >= 1.0:
                    break
                dense_from = b
            sparse.dense_from_batch = dense_from
            if dense_from is not None and fallback == "keep":
                sparse.dense_weight = lin.weight.detach()  # the swapped-out layer's own storage
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, sparse)
        reason = "measured faster" if measure else "not measured"
        if dense_from:
            reason += f"; dense from batch {dense_from}"
        choices.append(LayerChoice(name, shape, str(pat), "sparse", reason, ratios, dense_from))
    report = CompressReport(choices)
    if verbose:
        print(report)
    return report
