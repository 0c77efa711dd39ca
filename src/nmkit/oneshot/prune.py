"""Whole-model one-shot pruning: score each selected layer, solve its mask, zero the pruned weights."""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from nmkit.errors import UserError
from nmkit.oneshot.methods import METHODS
from nmkit.oneshot.permute import PermutationChange, permutable
from nmkit.oneshot.results import LayerResult, PruneResult
from nmkit.oneshot.sequential import prune_sequential
from nmkit.oneshot.targets import Target, check_prunable, find_targets
from nmkit.patterns import Pattern, PatternError, TailPolicy, parse, summarize
from nmkit.permute_model import permute_model
from nmkit.solvers import mask_for


@torch.no_grad()
def prune(
    model: nn.Module,
    pattern: Pattern | str,
    method: str = "magnitude",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    tail: TailPolicy = "error",
    progress: bool = True,
    calibration: torch.Tensor | None = None,
    **options,
) -> PruneResult:
    """Prune ``model`` in place to ``pattern`` ("2:4" keeps 2 of every 4 weights along the input dim).

    ``magnitude`` needs no data. Calibrated methods (``wanda``, ``sparsegpt``, ...) need
    ``calibration``: token ids of shape (samples, seqlen), e.g. from :func:`nmkit.data.calibration_windows`;
    ``layer_patterns`` (name -> pattern) overrides ``pattern`` per layer (a plan);
    extra keyword ``options`` (checkpoint_dir, resume, blocksize, damp, ...) go to
    :func:`nmkit.oneshot.sequential.prune_sequential`.
    """
    pattern = parse(pattern)
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    if METHODS[method].calibrated:
        if calibration is None:
            raise UserError(f"method {method!r} needs calibration data (token ids, shape (samples, seqlen))")
        run = {k: options.pop(k) for k in ("checkpoint_dir", "resume", "run_config", "batch", "stop_after_block",
                                           "permute", "permute_budget_s", "keep_checkpoint", "ranks", "layer_patterns")
               if k in options}
        return prune_sequential(model, pattern, method, calibration, include, exclude, tail, options,
                                progress=progress, **run)
    data_free = METHODS[method]  # scores each weight on its own, in the layer's own orientation
    targets = find_targets(model, include, exclude)
    check_prunable(model, targets)
    result = PruneResult(str(pattern), method)
    start = time.perf_counter()
    per_layer = {name: parse(p) for name, p in (options.pop("layer_patterns", None) or {}).items()}
    if options.pop("permute", False):
        if per_layer:
            raise UserError("--permute is not supported with per-layer patterns (a plan)")
        result.permutations = _permute_whole_model(model, targets, pattern, options.pop("permute_budget_s", 1.0))
    for target in tqdm(targets, desc=f"prune {pattern} ({method})", unit="layer", disable=not progress):
        weight = target.weight
        layer_pattern = per_layer.get(target.name, pattern)
        try:
            mask = mask_for(data_free.score(weight, None, 0.0), layer_pattern, dim=target.reduce_dim, tail=tail)
        except PatternError as exc:
            raise UserError(f"layer {target.name} {list(weight.shape)}: {exc}") from None
        weight.mul_(mask.to(weight.dtype)).add_(0.0)  # -0.0 -> +0.0: one zero, bit-exact round trips
        info = summarize(weight, layer_pattern, dim=target.reduce_dim, tail=tail)
        result.layers.append(LayerResult(target.name, info["shape"], str(layer_pattern), info["sparsity"],
                                         info["valid"]))
    result.seconds = time.perf_counter() - start
    return result


def _permute_whole_model(model: nn.Module, targets: list[Target], pattern: Pattern, budget_s: float) -> list:
    """Magnitude path: absorbable permutations of the targeted consumers, scored by |W|."""
    if not permutable(pattern):
        raise UserError(f"--permute supports plain N:M patterns (e.g. 2:4, 4:8), not {pattern}")
    wanted = {t.name for t in targets}
    report = permute_model(model, pattern, time_budget_s=budget_s, max_escapes=0, consumers=wanted.__contains__)
    return [PermutationChange(c.name, c.kept_default, c.kept) for c in report.changes]
