"""The budgeted choice: one pattern per layer, least total loss, total cost within a budget.

A multiple-choice knapsack solved exactly by dynamic programming over costs counted in whole ticks of
``budget / resolution`` seconds (each cost rounded up, so a returned plan always fits the real budget;
with costs that are whole ticks, as in the tests, the optimum is exact). ``best[c]`` is the least loss
of the layers so far with total cost at most ``c`` ticks; one table of choices per layer gives the plan
back.
"""

from __future__ import annotations

import math

import numpy as np

from nmkit.errors import UserError


def solve(options: dict[str, dict[str, tuple[float, float]]], budget: float,
          resolution: int = 20000) -> dict[str, str]:
    """``options``: layer -> pattern -> (cost, loss). The plan (layer -> pattern) of least total loss
    whose total cost is at most ``budget``; :class:`UserError` when even the cheapest choices exceed it."""
    if not options:
        raise UserError("no layers to plan")
    for name, choices in options.items():
        if not choices:
            raise UserError(f"layer {name} has no pattern the device supports")
    cheapest = sum(min(c for c, _ in ch.values()) for ch in options.values())
    if budget <= 0 or cheapest > budget * (1 + 1e-12):
        raise UserError(f"budget {budget:.6g} is below the cheapest plan's {cheapest:.6g}")
    tick = budget / resolution
    size = resolution + 1
    best = np.zeros(size)  # no layers yet: loss 0 at every budget
    names = list(options)
    picks = []
    for name in names:
        patterns = list(options[name])
        nxt = np.full(size, np.inf)
        choice = np.full(size, -1, dtype=np.int16)
        for j, p in enumerate(patterns):
            cost, loss = options[name][p]
            t = max(0, math.ceil(cost / tick - 1e-9))
            if t >= size:
                continue
            cand = np.full(size, np.inf)
            cand[t:] = best[: size - t] + loss
            better = cand < nxt
            nxt[better], choice[better] = cand[better], j
        best = nxt
        picks.append((patterns, choice))
    if not np.isfinite(best[-1]):
        raise UserError(f"budget {budget:.6g} cannot be met at the solver's resolution (the cheapest plan needs "
                        f"{cheapest:.6g}); loosen the target slightly")
    plan, c = {}, resolution
    for name, (patterns, choice) in zip(reversed(names), reversed(picks), strict=True):
        j = int(choice[c])
        plan[name] = patterns[j]
        c -= max(0, math.ceil(options[name][patterns[j]][0] / tick - 1e-9))
    return dict(reversed(list(plan.items())))
