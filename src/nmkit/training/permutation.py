"""Input permutations during N:M training: one-shot (fixed from the start) or learned (PA-DST style).

N:M groups are M *consecutive* input channels, so a layer only reaches the masks whose groups follow
the stored order. Reordering a layer's inputs first, ``y = S (P x)`` with ``S`` N:M in its own
order, lets every group gather any M channels. The permutation-augmented dynamic sparse training
idea (Tyagi et al., 2025, "Efficient Dynamic Structured Sparse Training with Learned Shuffles",
PA-DST) learns ``P`` jointly with ``S``: a relaxed, doubly-stochastic ``P`` during training that ends
as a true permutation, so the deployed layer is plain N:M behind a fixed reordering.

Here, per layer:

1. ``P`` is soft: ``sinkhorn((a0 * I + L) / tau)``, block-diagonal over windows of ``block`` inputs
   (``L`` the learned logits, ``a0`` sized so P starts at ``init_diag`` on the diagonal, i.e. close to
   the identity, so training starts from the plain layer). The mixing is applied to the weight,
   ``W_eff = S @ P`` (cheaper than mixing every token), with ``tau`` annealed geometrically from
   ``tau_start`` to ``tau_end`` until ``harden_at``.
2. At ``harden_at`` the logits are rounded to the nearest permutation (an exact linear assignment
   per window) and frozen; training goes on with ``y = S x[perm]``, so ``S`` recovers from the jump.
3. :func:`export` unwraps each layer into ``PermutedInput(linear, perm)`` (the very same computation)
   or, where the producing layer can take the reordering on its output rows, permutes those rows and
   leaves a plain Linear: free at inference.

``padst`` follows the PA-DST code and AutoShuffleNet (Lyu et al., KDD 2020) more closely: no anchor, so
nothing holds ``P`` at its start; the logits start random (``init_scale`` times a standard normal, one
generator per layer seeded from ``seed``), so ``P`` starts as a random, well-mixing doubly-stochastic
matrix; the temperature stays at ``tau_start``; and what drives ``P`` to a permutation is the exact
penalty ``sum_rows (|r|_1 - |r|_2) + sum_cols (|c|_1 - |c|_2)`` (zero on a doubly-stochastic matrix
iff it is a permutation), added to the loss with a weight ramped from 0 to ``penalty`` over the soft
phase (:meth:`SparseTraining.permutation_penalty`). Hardening is step 2 as above. Why: anchored at
the identity, ``learned`` never moved an input (the logits must climb ~ln(9(B-1)) against the anchor
while the weights co-adapt to the current order); from random init there is no privileged order.
Measured on the tiny GPT from scratch, padst moves inputs but ends worse than no permutation
(docs/training.md): the soft phase's mixing costs more than any order it finds.

``oneshot`` is step 2 from step 0 with ``perm`` from nmkit's permutation search on ``|W|``.
``dynamic`` (a variant, not from the paper) is step 2 from step 0 too, but re-runs that search on the
current dense master weight every ``every`` steps until ``harden_at``: the grouping follows the
weights as they train. Each move re-orders the stored weight columns and the optimiser's state with
them (the dense function is unchanged; the N:M masks are recomputed in the new order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.permute_model import PermutedInput
from nmkit.solvers.permutation import permute_channels

PERMUTE = (None, "oneshot", "learned", "padst", "dynamic")
LEARNED = ("learned", "padst")  # the modes with trained logits


@dataclass(frozen=True)
class PermuteConfig:
    """Knobs of the input permutation (see the module docs).

    ``harden_at``: fraction of ``Schedule.total_steps`` at which the learned permutation becomes hard.
    ``tau_start``/``tau_end``: Sinkhorn temperature, annealed geometrically up to ``harden_at``.
    ``block``: the largest window permuted as one (its cost is ``in * block`` logits per layer); a
    layer uses the largest multiple of M dividing its input size that is at most ``block``.
    ``init_diag``: the soft permutation's diagonal at the start (1 would be the identity).
    ``penalty``: padst: the L1-L2 penalty's final weight (reached at ``harden_at``, linear from 0;
    the penalty is a mean over rows and columns, so it is in nats-comparable units, 0..1).
    ``init_scale``: padst: std of the random initial logits (before dividing by the temperature); 6 at
    block 128 gives rows whose largest entry is ~0.6: small scales (PA-DST's near-uniform start) mix
    the inputs so much that the layer's signal shrinks (scale 1: ~11x) and short runs suffer.
    ``seed``: padst: seeds the initial logits (layer i uses ``seed + i``).
    ``iters``: Sinkhorn normalisation rounds. ``oneshot_budget_s``: search time per layer (oneshot,
    dynamic). ``every``: dynamic: steps between two searches.
    ``producers``: ``{consumer name: [producer Linear names]}`` whose output rows can take the
    consumer's input order (an elementwise function between them); Llama-style MLPs
    (``gate_proj``/``up_proj`` -> ``down_proj``) are found without it.
    """

    harden_at: float = 0.5
    tau_start: float = 1.0
    tau_end: float = 0.05
    block: int = 1024
    init_diag: float = 0.9
    iters: int = 20
    oneshot_budget_s: float = 0.5
    every: int = 50
    penalty: float = 0.3
    init_scale: float = 6.0
    seed: int = 0
    producers: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.harden_at <= 1.0:
            raise UserError(f"harden_at is a fraction of total_steps in (0, 1], got {self.harden_at}")
        if not 0.0 < self.tau_end <= self.tau_start:
            raise UserError(f"need 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")
        if not 0.0 < self.init_diag < 1.0:
            raise UserError(f"init_diag must be in (0, 1), got {self.init_diag}")
        if not (self.penalty >= 0.0 and self.init_scale > 0.0):
            raise UserError(f"need penalty >= 0 and init_scale > 0, got {self.penalty}, {self.init_scale}")
        if self.iters < 1 or self.block < 1 or self.every < 1:
            raise UserError("iters, block and every must be positive")


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly-stochastic matrices from ``(..., n, n)`` logits: alternate row and column normalisation
    in log space (stable at low temperature)."""
    z = logits
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)
    return z.exp()


def l1_l2_penalty(p: torch.Tensor) -> torch.Tensor:
    """AutoShuffleNet's exact penalty for ``(..., n, n)`` non-negative matrices, as a mean: the average
    over every row and column of ``|v|_1 - |v|_2``. On doubly-stochastic matrices it is 0 exactly at
    permutations and at most ``1 - 1/sqrt(n)`` (the uniform matrix)."""
    rows = p.sum(-1) - p.norm(dim=-1)
    cols = p.sum(-2) - p.norm(dim=-2)
    return (rows.mean() + cols.mean()) / 2


def hard_assignment(logits: torch.Tensor) -> torch.Tensor:
    """Per window ``(blocks, B, B)``, the permutation maximising ``sum_j logits[j, perm[j]]`` (exact)."""
    from scipy.optimize import linear_sum_assignment

    blocks, size, _ = logits.shape
    perm = torch.empty(blocks * size, dtype=torch.long)
    for b, z in enumerate(logits.detach().double().cpu().numpy()):
        rows, cols = linear_sum_assignment(z, maximize=True)
        perm[b * size + torch.as_tensor(rows)] = b * size + torch.as_tensor(cols)
    return perm


def window(in_features: int, group: int, block: int) -> int:
    """The largest multiple of ``group`` dividing ``in_features`` that is at most ``max(block, group)``."""
    best = group
    for size in range(group, min(in_features, max(block, group)) + 1, group):
        if in_features % size == 0:
            best = size
    return best


class PermutedLinear(nn.Module):
    """``inner(P x)`` while training: ``P`` soft (weight-side mixing) until hardened, then ``x[perm]``.

    ``inner`` keeps its (N:M-parametrized) weight in the permuted order. After hardening the forward is
    exactly ``PermutedInput(inner, perm)``'s, which is what :func:`export` leaves behind.

    ``init_diag`` anchors the soft permutation near the identity (``learned``); ``random=(scale, seed)``
    instead starts from random logits with no anchor (``padst``).
    """

    def __init__(
        self,
        inner: nn.Linear,
        block: int,
        init_diag: float,
        tau: float,
        perm: torch.Tensor | None,
        iters: int = 20,
        random: tuple[float, int] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.iters = iters
        n = inner.in_features
        dev = inner.weight.device
        self.block = block
        shape = (n // block, block, block)
        if random is None:
            self.logits = nn.Parameter(torch.zeros(shape, device=dev))
            # a0 / tau_start gives the diagonal init_diag: exp(c) / (exp(c) + B - 1) = init_diag.
            c = math.log(init_diag / (1.0 - init_diag) * max(block - 1, 1))
            self.register_buffer("anchor", torch.eye(block, device=dev) * c * tau)
        else:  # own generator: the same start for a seed whatever else used the global RNG
            scale, seed = random
            z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=inner.weight.dtype)
            self.logits = nn.Parameter(z.to(dev) * scale * tau)
            self.register_buffer("anchor", torch.zeros(block, block, device=dev))
        self.register_buffer("tau", torch.tensor(float(tau), device=dev))
        self.register_buffer("perm", torch.arange(n, device=dev) if perm is None else perm.to(dev))
        self.register_buffer("hardened", torch.tensor(perm is not None, device=dev))
        # Where the logits point at the start: "moved" is measured against this, not the identity.
        start = perm if perm is not None else hard_assignment(self.anchor + self.logits)
        self.register_buffer("start_perm", start.to(dev))
        if perm is not None:
            self.logits.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # code that looks for .weight finds the stored (permuted-order) one
        return self.inner.weight

    def soft(self) -> torch.Tensor:
        """The current soft permutation, ``(blocks, B, B)``: entry ``[b, j, i]`` feeds input i to slot j."""
        return sinkhorn((self.anchor + self.logits) / self.tau, self.iters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.hardened):
            return self.inner(x.index_select(-1, self.perm))
        s = self.inner.weight
        p = self.soft().to(s.dtype)
        out, n = s.shape
        w = torch.einsum("onj,nji->oni", s.reshape(out, n // self.block, self.block), p).reshape(out, n)
        return F.linear(x, w, self.inner.bias)

    @torch.no_grad()
    def harden(self) -> None:
        """Round to the nearest permutation and freeze it; the logits stop training."""
        if bool(self.hardened):
            return
        self.perm.copy_(hard_assignment(self.anchor + self.logits).to(self.perm.device))
        self.hardened.fill_(True)
        self.logits.requires_grad_(False)
        self.logits.grad = None

    @torch.no_grad()
    def reorder(self, new_perm: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        """Switch to ``new_perm`` keeping the dense function: move the stored columns (and the optimiser's
        per-weight state) so that slot j holds input ``new_perm[j]``. Masks must be recomputed after."""
        new_perm = new_perm.to(self.perm.device)
        sigma = torch.argsort(self.perm)[new_perm]  # old slot that holds the input new slot j wants
        w = self.inner.parametrizations.weight.original
        tensors = [w]
        if optimizer is not None:
            tensors += [t for t in optimizer.state.get(w, {}).values() if torch.is_tensor(t) and t.shape == w.shape]
        for t in tensors:
            t.copy_(t[:, sigma])
        self.perm.copy_(new_perm)

    def extra_repr(self) -> str:
        return f"block={self.block}, hardened={bool(self.hardened)}"


def oneshot_perm(weight: torch.Tensor, pattern: NM, budget_s: float) -> torch.Tensor:
    """nmkit's permutation search on ``|W|`` (deterministic: fixed seed and escape count)."""
    return permute_channels(weight.detach().abs().float().cpu(), pattern, time_budget_s=budget_s, max_escapes=20).perm


def temperature(step: int, harden_step: int, cfg: PermuteConfig) -> float:
    """Geometric anneal from ``tau_start`` (step 0) to ``tau_end`` (``harden_step``)."""
    frac = min(step / max(harden_step, 1), 1.0)
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac


def _producers(model: nn.Module, consumer: str, cfg: PermuteConfig) -> list[str] | None:
    """Names of the Linears whose output rows can absorb ``consumer``'s input permutation, or None."""
    if consumer in cfg.producers:
        return list(cfg.producers[consumer])
    parent, _, child = consumer.rpartition(".")
    if child == "down_proj":
        named = dict(model.named_modules())
        mlp = named.get(parent) if parent else model
        if mlp is not None and hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            pre = f"{parent}." if parent else ""
            return [f"{pre}gate_proj", f"{pre}up_proj"]
    return None


@torch.no_grad()
def export(model: nn.Module, wrapped: Mapping[str, PermutedLinear], cfg: PermuteConfig) -> dict[str, str]:
    """Replace every :class:`PermutedLinear` (already hardened) by what ships; ``{name: how}``.

    ``how`` is ``"identity"`` (the permutation did not move anything: a plain Linear), ``"absorbed"``
    (the producers' output rows were permuted: a plain Linear, free) or ``"runtime"`` (a
    :class:`PermutedInput` gather). Inner weights must already be plain tensors.
    """
    named = dict(model.named_modules())
    kinds: dict[str, str] = {}
    for name, wrapper in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        parent = named[parent_name] if parent_name else model
        producers = _producers(model, name, cfg)
        if torch.equal(wrapper.perm, torch.arange(len(wrapper.perm), device=wrapper.perm.device)):
            setattr(parent, child, wrapper.inner)
            kinds[name] = "identity"
        elif producers is not None and all(p in named for p in producers):
            for p in producers:
                target = named[p]
                target = target.inner if isinstance(target, (PermutedLinear, PermutedInput)) else target
                if not isinstance(target, nn.Linear) or target.out_features != wrapper.inner.in_features:
                    raise UserError(
                        f"producer {p!r} of {name!r} is not a Linear with {wrapper.inner.in_features} outputs"
                    )
                target.weight.copy_(target.weight[wrapper.perm])
                if target.bias is not None:
                    target.bias.copy_(target.bias[wrapper.perm])
            setattr(parent, child, wrapper.inner)
            kinds[name] = "absorbed"
        else:
            setattr(parent, child, PermutedInput(wrapper.inner, wrapper.perm))
            kinds[name] = "runtime"
        named = dict(model.named_modules())
    return kinds
