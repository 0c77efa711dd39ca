"""``nmkit.sparsify_(model, config)``: prune a model in place from one recipe (see :mod:`nmkit.recipe`).

Layers that share a pattern are pruned together, one group after another in the order of the recipe's
``layers`` globs (the default pattern last); a calibrated method then sees the earlier groups pruned,
as a sequential pipeline would.
"""

from __future__ import annotations

import torch
from torch import nn

from nmkit.errors import UserError
from nmkit.oneshot import prune
from nmkit.oneshot.methods import METHODS
from nmkit.oneshot.results import PruneResult
from nmkit.oneshot.targets import find_targets
from nmkit.recipe import Recipe, from_dict


def plan(model: nn.Module, recipe: Recipe) -> dict[str, list[str]]:
    """Pattern -> names of the layers that get it, in pruning order; checks every glob selects a layer."""
    names = [t.name for t in find_targets(model, recipe.include, recipe.exclude)]
    recipe.check_globs(names)
    groups: dict[str, list[str]] = {}
    for pattern in [*recipe.layers.values(), recipe.pattern]:
        groups.setdefault(pattern, [])
    for name in names:
        groups[recipe.pattern_for(name)].append(name)
    return {p: g for p, g in groups.items() if g}


def sparsify_(model: nn.Module, config: dict | Recipe, calibration: torch.Tensor | None = None,
              progress: bool = True, **options) -> PruneResult:
    """Prune ``model`` in place as ``config`` says (a :class:`nmkit.recipe.Recipe` or its dict form).

    ``calibration``: token ids (samples, seqlen) for calibrated methods. ``options`` go to
    :func:`nmkit.prune` (e.g. ``checkpoint_dir``). Returns one result over every pruned layer.
    """
    recipe = config if isinstance(config, Recipe) else from_dict(config)
    if METHODS[recipe.method].calibrated and calibration is None:
        raise UserError(f"method {recipe.method!r} needs calibration data (token ids, shape (samples, seqlen))")
    groups = plan(model, recipe)
    merged = PruneResult(recipe.pattern, recipe.method)
    checkpoint = options.pop("checkpoint_dir", None)
    for i, (pattern, names) in enumerate(groups.items()):
        extra = dict(options)
        if recipe.permute:
            extra |= {"permute": True, "permute_budget_s": recipe.permute_budget_s}
        if checkpoint is not None and METHODS[recipe.method].calibrated:
            extra["checkpoint_dir"] = checkpoint.with_name(f"{checkpoint.name}-{i}") if len(groups) > 1 else checkpoint
        result = prune(model, pattern, recipe.method, include=names, exclude=None, tail=recipe.tail,
                       progress=progress, calibration=calibration, **extra)
        merged.layers += result.layers
        merged.seconds += result.seconds
        merged.permutations += result.permutations
    return merged


__all__ = ["plan", "sparsify_"]
