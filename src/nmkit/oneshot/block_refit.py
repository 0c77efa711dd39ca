"""Block reconstruction: after a block's layers are pruned one at a time, fit its kept weights jointly
so that the pruned block reproduces the *dense* model's block output (masks fixed).

A layer solve matches one Linear's output on its own inputs; what the other layers of the block and
the blocks before it got wrong is absorbed only in part. Here every pruned Linear of the block is
trained together, a few epochs of Adam over the calibration windows, on

    mean || block(h_pruned) - y_dense ||^2,   y_dense = the dense block's output on the dense model's input,

so the block also corrects the error its predecessors passed on (block-wise reconstruction in the spirit
of EBFT, Guo et al. 2024, with the teacher stream of the dense model). Gradients and weights are
masked after every step: the pattern of every layer is exactly what the layer solve chose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmkit.oneshot.targets import Target


@dataclass(frozen=True)
class RefitResult:
    loss_before: float  # mean squared error of the block output vs the dense one, over all windows
    loss_after: float


def _block_loss(block: nn.Module, hidden: torch.Tensor, target: torch.Tensor, kwargs: dict, batch: int) -> float:
    total = 0.0
    with torch.no_grad():
        for s in range(0, hidden.shape[0], batch):
            out = block(hidden[s : s + batch], **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            total += float(((out - target[s : s + batch]) ** 2).sum())
    return total / target.numel()


def refit_block(block: nn.Module, targets: list[Target], hidden: torch.Tensor, target: torch.Tensor, kwargs: dict,
                epochs: int = 4, lr: float = 1e-3, batch: int = 4, seed: int = 0) -> RefitResult:
    """Adam on the kept weights of ``targets`` (masks = their nonzeros) to map ``hidden`` to ``target``.

    Deterministic for a fixed seed and thread count (the window order is drawn from ``seed``).
    """
    weights = [t.weight for t in targets]
    pruned = [w.detach() == 0 for w in weights]
    start = [w.detach().clone() for w in weights]
    before = _block_loss(block, hidden, target, kwargs, batch)
    trainable = {id(w) for w in weights}
    frozen = [p for p in block.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(weights, lr=lr)
    order = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            for _ in range(epochs):
                for idx in torch.randperm(hidden.shape[0], generator=order).split(batch):
                    out = block(hidden[idx], **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = ((out - target[idx]) ** 2).mean()
                    optimizer.zero_grad(set_to_none=False)
                    loss.backward()
                    for w, off in zip(weights, pruned, strict=True):
                        w.grad.masked_fill_(off, 0.0)
                    optimizer.step()
                    with torch.no_grad():
                        for w, off in zip(weights, pruned, strict=True):
                            w.masked_fill_(off, 0.0)  # exact +0.0 off the mask, whatever the optimiser's rounding
    finally:
        for w in weights:
            w.grad = None
        for p in frozen:
            p.requires_grad_(True)
    after = _block_loss(block, hidden, target, kwargs, batch)
    if not after <= before:  # never hand on a block worse than the layer solves left it (or NaN)
        with torch.no_grad():
            for w, w0 in zip(weights, start, strict=True):
                w.copy_(w0)
        after = before
    return RefitResult(before, after)
