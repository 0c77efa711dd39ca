"""Train Linear layers (the FFN's, above all) on sparse operands: V:N:M activations, N:M weights.

Each call chooses the input's V:N:M entries (:func:`nmkit.dynamic.vnm_activations.select_vnm`), and
all three products of the layer, ``y = x W^T``, ``dx = dy W`` and ``dW = dy^T x``, run block by block
of V tokens on the kept feature columns only: a dense product with 4 / M of the reduction length
(half at M = 8). On a CPU that is where the time goes, because the dense BLAS (MKL fp32, oneDNN's
AMX bf16) is near its peak at training batch sizes and no gather-based N:M kernel beats it there
(nmkit's own SpMM reaches 0.8-1.0x of MKL at 512-2048 tokens). The weight's N:M mask (from
:class:`~nmkit.training.SparseTraining`, or fixed) is applied as values; a sparse tensor core would
skip its zeros too, a CPU cannot.

    swap = VNMActivationTraining(model, "256:2:8", targets=["*.mlp.*"])
    ... train ...
    swap.remove()       # the original Linear modules are back, their weights trained

Gradients: the pruned activation entries get none (the layer sees zeros there), exactly as autograd
gives for the dense reference ``select_vnm(x).dense() @ W^T`` (tested).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from nmkit.dynamic.vnm_activations import VNMSelection, check_vnm_width, select_vnm
from nmkit.errors import UserError
from nmkit.patterns import VNM
from nmkit.patterns import parse as parse_pattern


class _VNMLinearFunction(torch.autograd.Function):
    """``y = x_vnm W^T + b`` with x (tokens, in); every product on the kept columns only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pattern: VNM,
                weight_mask: torch.Tensor | None):
        sel = select_vnm(x, pattern)
        blocks, v, _ = sel.values.shape
        y = x.new_empty(blocks, v, weight.shape[0])
        kept_weight = kept_mask = None
        for b in range(blocks):
            kept_weight, kept_mask = _kept_weight(sel, weight, weight_mask, b)
            torch.mm(sel.values[b], kept_weight.t(), out=y[b])
        y = y.reshape(blocks * v, -1)[: sel.tokens]
        if bias is not None:
            y += bias
        # One block (V >= tokens, the fast case): keep its gathered weight and mask instead of gathering again.
        if blocks == 1:
            weight, weight_mask = kept_weight, kept_mask
        ctx.save_for_backward(sel.offsets, sel.values, sel.keep, weight, weight_mask)
        ctx.tokens, ctx.group, ctx.has_bias = sel.tokens, sel.group, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        offsets, values, keep, weight, weight_mask = ctx.saved_tensors
        sel = VNMSelection(offsets=offsets, values=values, keep=keep, tokens=ctx.tokens, group=ctx.group)
        blocks, v, _ = values.shape
        tokens = sel.tokens
        grad_y = grad_y.contiguous()
        if blocks * v != tokens:
            grad_y = F.pad(grad_y, (0, 0, 0, blocks * v - tokens))
        grad_y = grad_y.reshape(blocks, v, -1)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w = [], None
        for b in range(blocks):
            kept_weight, kept_mask = _kept_weight(sel, weight, weight_mask, b) if blocks > 1 else (weight, weight_mask)
            if need_x:
                grad_x.append(sel.scatter(torch.mm(grad_y[b], kept_weight).mul_(keep[b]), b))
            if need_w:
                part = torch.mm(grad_y[b].t(), values[b])
                if kept_mask is not None:
                    part.mul_(kept_mask)
                grad_w = sel.scatter(part, b) if grad_w is None else sel.scatter(part, b, into=grad_w)
        grad_x = (grad_x[0] if blocks == 1 else torch.cat(grad_x))[:tokens] if need_x else None
        grad_b = grad_y.reshape(blocks * v, -1)[:tokens].sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


def _kept_weight(sel: VNMSelection, weight: torch.Tensor, mask: torch.Tensor | None,
                 block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in * 4 / M): the columns of W (masked) that ``block`` keeps, and those of the mask."""
    kept = sel.gather(weight, block)
    if mask is None:
        return kept, None
    kept_mask = sel.gather(mask, block)
    return kept.mul_(kept_mask), kept_mask


def vnm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pattern: VNM | str,
               weight_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x_vnm, weight * weight_mask, bias)``: ``x``'s features pruned to ``pattern`` (V:N:M,
    e.g. ``"2048:2:8"``) per call. ``x`` (..., in); tokens are all leading dims flattened (blocks of V
    run across sequence ends). ``weight_mask`` (a fixed N:M mask, bool) is applied to the gathered
    columns only, cheaper than masking the whole weight first."""
    pattern = as_vnm(pattern)
    if weight_mask is not None and weight_mask.shape != weight.shape:
        raise UserError(f"weight_mask has shape {tuple(weight_mask.shape)}, the weight {tuple(weight.shape)}")
    lead = x.shape[:-1]
    if weight_mask is not None and weight_mask.dtype != torch.bool:
        raise UserError(f"weight_mask must be a bool tensor (True = kept), got {weight_mask.dtype}")
    y = _VNMLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, pattern, weight_mask)
    return y.reshape(*lead, weight.shape[0])


def as_vnm(pattern: VNM | str) -> VNM:
    """``pattern`` as a :class:`VNM`; one clear line if it is another kind."""
    parsed = parse_pattern(pattern) if isinstance(pattern, str) else pattern
    if not isinstance(parsed, VNM):
        raise UserError(f"activation pattern {pattern!r} is not V:N:M; write it as V:N:M, e.g. '256:2:8'")
    return parsed


class VNMActivationLinear(nn.Module):
    """Runs a wrapped ``nn.Linear`` (its parametrizations included) with V:N:M inputs."""

    def __init__(self, linear: nn.Linear, pattern: VNM) -> None:
        super().__init__()
        check_vnm_width(linear.in_features, pattern)
        self.linear, self.pattern = linear, pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vnm_linear(x, self.linear.weight, self.linear.bias, self.pattern)

    def extra_repr(self) -> str:
        return f"activations={self.pattern}"


class VNMActivationTraining:
    """Swap every ``nn.Linear`` whose name matches ``targets`` (globs; default the FFN's: names with
    ``mlp`` or ``fc``/``out`` of a block) for a :class:`VNMActivationLinear` around it, until :meth:`remove`.

    Compose with :class:`~nmkit.training.SparseTraining` for N:M weights: attach that first, so its
    parametrized weight is what the wrapper reads.
    """

    def __init__(self, model: nn.Module, pattern: VNM | str = "256:2:8",
                 targets: Iterable[str] = ("*mlp.*", "*.fc", "*.out")) -> None:
        self.pattern = as_vnm(pattern)
        self.model = model
        globs = list(targets)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, g) for g in globs)]
        if not names:
            raise UserError(f"no nn.Linear in {type(model).__name__} matches {globs}; pass targets= with the "
                            "FFN layers' names (see model.named_modules())")
        for name in names:
            check_vnm_width(model.get_submodule(name).in_features, self.pattern)
        self.swapped: dict[str, nn.Linear] = {}
        for name in names:
            linear = model.get_submodule(name)
            self._set(name, VNMActivationLinear(linear, self.pattern))
            self.swapped[name] = linear

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def remove(self) -> dict[str, nn.Linear]:
        """Put the original Linear modules back; returns them by name."""
        for name, linear in self.swapped.items():
            self._set(name, linear)
        swapped, self.swapped = self.swapped, {}
        return swapped

    def __enter__(self) -> VNMActivationTraining:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
