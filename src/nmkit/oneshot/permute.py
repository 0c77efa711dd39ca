"""Channel permutations inside the one-shot pipeline (``nmkit prune --permute``).

For each block, after its calibration statistics are collected and before its layers are pruned,
the input channels of ``down_proj`` (absorbed by ``gate_proj``/``up_proj`` outputs) and of
``o_proj`` (absorbed by ``v_proj`` outputs, inside each KV head) are permuted so that N:M keeps
more of the method's own importance score. The block computes the same function as before; the
statistics of the permuted inputs are permuted to match, so the method then prunes as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmkit import scores
from nmkit.oneshot.methods import METHODS
from nmkit.oneshot.stats import InputStats
from nmkit.oneshot.targets import Target
from nmkit.patterns import NM, Pattern
from nmkit.permute_model import permute_model
from nmkit.solvers.permutation import kept_by_nm


@dataclass
class PermutationChange:
    name: str
    kept_default: float  # score N:M keeps without the permutation
    kept: float  # and with it

    @property
    def gain(self) -> float:
        return self.kept / self.kept_default - 1.0 if self.kept_default else 0.0


def permutable(pattern: Pattern) -> bool:
    """Permutations are searched for plain row-wise N:M only (other patterns constrain more than rows)."""
    return type(pattern) is NM


def importance(method: str, w: torch.Tensor, stats: InputStats | None, damp: float = 0.01) -> torch.Tensor:
    """The score ``method`` keeps (its record's ``score``), as a (out, in) non-negative matrix; |W| for a
    layer without statistics."""
    w = w.detach().float()
    if stats is None:
        return scores.magnitude(w)
    return METHODS[method].score(w, stats, damp)


def _permute_stats(stats: InputStats, perm: torch.Tensor) -> None:
    stats.xtx = stats.xtx[perm][:, perm]
    if stats.histogram is not None:
        stats.histogram = stats.histogram[perm]
        stats.hist_range = stats.hist_range[perm]


@torch.no_grad()
def permute_block(
    block: nn.Module,
    targets: list[Target],
    stats: dict[str, InputStats],
    pattern: NM,
    method: str,
    time_budget_s: float = 1.0,
    seed: int = 0,
    damp: float = 0.01,
    max_escapes: int = 0,
) -> list[PermutationChange]:
    """Permute ``block``'s absorbable input channels in place (weights and ``stats``) for ``method``.

    Only pairs whose consumer is a pruning target are touched. Returns one change per permuted layer.
    Each search runs its local moves to convergence plus ``max_escapes`` perturbation rounds, so the
    result is deterministic unless ``time_budget_s`` cuts it short (then resumes are not bit-identical).
    """
    by_module = {id(t.module): t for t in targets}
    relative = {n: m for n, m in block.named_modules()}

    def score_fn(name: str, layer: nn.Linear) -> torch.Tensor:
        target = by_module.get(id(layer))
        return importance(method, layer.weight, stats.get(target.name) if target else None, damp)

    def wanted(name: str) -> bool:
        return id(relative[name]) in by_module

    report = permute_model(block, pattern, score_fn=score_fn, time_budget_s=time_budget_s, seed=seed,
                           max_escapes=max_escapes, consumers=wanted)
    changes = []
    for change in report.changes:
        target = by_module[id(relative[change.name])]
        if target.name in stats:
            _permute_stats(stats[target.name], change.perm)
        # permute_model scored the permuted weight with the statistics still in the old order: rescore
        kept = kept_by_nm(importance(method, target.weight, stats.get(target.name), damp), pattern)
        changes.append(PermutationChange(target.name, change.kept_default, kept))
    return changes
