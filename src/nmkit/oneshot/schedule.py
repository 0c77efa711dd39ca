"""Which rank solves which rows of which layer: the per-block work plan of a distributed prune.

Each target layer is one job. A job may be cut into row ranges (row blocks) solved by different ranks when
its method is row-separable and its pattern's groups lie within a row: each output row's mask and update
then read only that row and the layer's X^T X, which every rank holds after the all-reduce, so solving
rows [a, b) on one rank gives bit for bit the rows [a, b) of the whole solve.

The rule, per block: whole layers first, shared out longest first to the least loaded rank (LPT); then
the layer of the longest piece (among equals, one that can still be cut) is cut into one more row range,
again and again (at most one range per rank), and the plan whose busiest rank has the least work wins
(fewest cuts on ties). A piece costs its rows' share of the layer's work plus the layer's fixed cost
(SparseGPT's factorisation of the damped Hessian), which every rank holding a piece of the layer repeats:
a layer is cut only where that shortens the block.
"""

from __future__ import annotations

from dataclasses import dataclass

from nmkit.patterns import NM, Dense, Pattern, Unstructured

# Methods whose solve treats each output row on its own given X^T X (tests/test_distributed.py checks
# each: solving a row slice equals that slice of the whole solve, bit for bit). A method not listed is
# never cut: being listed is the claim, and nothing is assumed of a method added later.
#   magnitude, wanda: a score per weight, top-k within each row's groups;
#   sparsegpt: the sweep's error feedback multiplies each row's error by rows of H^-1's factor;
#   sparsegpt-refit, admm: plus conjugate gradients / ADMM steps that are per-row linear algebra.
# The *-block methods and esparse are not listed: they are refused with several ranks anyway.
ROW_SEPARABLE_METHODS = frozenset({"magnitude", "wanda", "sparsegpt", "sparsegpt-refit", "admm"})

# Patterns whose groups lie within one row (exact types: Transposable subclasses NM but couples rows).
_ROW_PATTERNS = (NM, Unstructured, Dense)


def row_separable(method: str, pattern: Pattern) -> bool:
    """True when ``method`` with ``pattern`` solves each output row independently (rows may be split)."""
    return method in ROW_SEPARABLE_METHODS and type(pattern) in _ROW_PATTERNS


@dataclass(frozen=True)
class Job:
    """One layer's solve as the scheduler sees it (costs in arbitrary, consistent units)."""

    rows: int  # output rows of the (out, in) weight
    per_row: float  # work per row
    fixed: float = 0.0  # work each piece pays whatever its rows (a factorisation)
    splittable: bool = False  # rows may go to different ranks (:func:`row_separable`)


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of a layer's (out, in) weight, solved by ``rank``."""

    rank: int
    start: int
    stop: int


Plan = dict[str, list[Piece]]  # layer name -> its pieces, in row order


def _ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    bounds = [rows * k // parts for k in range(parts + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def _lpt(jobs: dict[str, Job], parts: dict[str, int], size: int) -> tuple[Plan, float]:
    """Pieces longest first to the least loaded rank (ties by name, row, rank); the plan and its busiest load."""
    pieces = [(job.fixed + (stop - start) * job.per_row, name, start, stop)
              for name, job in jobs.items() for start, stop in _ranges(job.rows, parts[name])]
    load = [0.0] * size
    plan: Plan = {name: [] for name in jobs}
    for cost, name, start, stop in sorted(pieces, key=lambda p: (-p[0], p[1], p[2])):
        rank = min(range(size), key=lambda r: (load[r], r))
        plan[name].append(Piece(rank, start, stop))
        load[rank] += cost
    for layer in plan.values():
        layer.sort(key=lambda p: p.start)
    return plan, max(load, default=0.0)


def plan_block(jobs: dict[str, Job], size: int) -> Plan:
    """The block's plan over ``size`` ranks (see the module docstring); the same on every rank."""
    parts = dict.fromkeys(jobs, 1)
    best, best_load = _lpt(jobs, parts, size)

    def largest_piece(name: str) -> float:
        job = jobs[name]
        return job.fixed + -(-job.rows // parts[name]) * job.per_row

    def can_cut(name: str) -> bool:
        job = jobs[name]
        return job.splittable and parts[name] < min(size, job.rows)

    while jobs:
        # Among equally long pieces a cuttable one first: stopping at an uncut tie left ranks idle (4 ranks,
        # wanda on down_proj + o_proj of the tiny Llama: 3 busy, the run refused).
        name = max(sorted(jobs), key=lambda n: (largest_piece(n), can_cut(n)))
        if not can_cut(name):
            break  # no longest piece can be cut: nothing shortens the block further
        parts[name] += 1
        plan, load = _lpt(jobs, parts, size)
        if load < best_load:
            best, best_load = plan, load
    return best


def busy_ranks(plan: Plan) -> int:
    """How many ranks the plan gives work to."""
    return len({p.rank for pieces in plan.values() for p in pieces})
