"""Sparsity inheritance (IDP): a family of N:M models from one, each child's mask a subset of its parent's.

E.g. 4:8 -> 2:8 -> 1:8: train (or take) the 4:8 model, then for each sparser pattern start from the
parent's weights and masks and fine-tune briefly with every mask update restricted to the parent mask.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nmkit.training.core import SparseTraining
from nmkit.training.schedule import Schedule

TrainFn = Callable[[nn.Module, SparseTraining], None]


def inherit_family(
    model: nn.Module,
    patterns: Sequence[str],
    train: TrainFn,
    method: str = "srste",
    schedule: Schedule | None = None,
    **kwargs,
) -> dict[str, nn.Module]:
    """Return ``{pattern: finalized model}``, training each pattern in order from the previous one.

    ``train(model, sparse)`` runs the short fine-tune (its own optimiser and data) on ``model``.
    The first pattern is trained from ``model`` unconstrained; each later one is restricted to the
    masks of the one before. ``model`` itself is not modified.
    """
    family: dict[str, nn.Module] = {}
    parent_masks: dict[str, torch.Tensor] | None = None
    current = model
    for spec in patterns:
        child = copy.deepcopy(current)
        sparse = SparseTraining(child, spec, method=method, schedule=schedule, within=parent_masks, **kwargs)
        train(child, sparse)
        sparse.finalize()
        parent_masks = {name: w != 0 for name, w in _linear_weights(child, sparse).items()}
        family[str(sparse.pattern)] = child
        current = child
    return family


def _linear_weights(model: nn.Module, sparse: SparseTraining) -> dict[str, torch.Tensor]:
    names = {layer.name for layer in sparse.layers}
    return {name: m.weight.detach() for name, m in model.named_modules() if name in names}


def is_subset(child: torch.Tensor, parent: torch.Tensor) -> bool:
    """True when every non-zero of ``child`` is non-zero in ``parent``."""
    return bool(((child != 0) & (parent == 0)).sum() == 0)
