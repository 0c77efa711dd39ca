"""The collective steps of a pruning run spread over processes (torch.distributed), and their one-process no-ops.

Every rank runs the same block loop on its own share of the calibration samples. Per block:

1. each rank collects X^T X (and token counts) of its samples; :meth:`Ranks.all_reduce_stats` sums them,
   so every rank then holds the statistics of all samples;
2. :meth:`Ranks.plan` shares the block's target layers out (:mod:`nmkit.oneshot.schedule`: largest solve
   first to the least loaded rank, a dominant layer of a row-separable method cut into row blocks);
   each rank solves its pieces;
3. :meth:`Ranks.share_rows` broadcasts each piece's rows from the rank that solved them, so every rank
   holds the whole pruned block before it propagates its samples through it.

gloo on CPU, NCCL on CUDA; no transport of our own. :class:`Ranks` with ``size == 1`` (the default) does
nothing, so the one-process pipeline is the same code. ``seconds`` counts the time spent in collectives
(the communication share of a run).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta

import torch

from nmkit.errors import UserError
from nmkit.oneshot.schedule import ROW_SEPARABLE_METHODS, Job, Plan, plan_block


class Ranks:
    """This process's place among the ranks of a run (``rank`` of ``size``), and the collectives it uses."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | None = None):
        self.rank, self.size = rank, size
        self.device = device or torch.device("cpu")  # where NCCL wants its tensors
        self.seconds = 0.0  # time spent in collectives

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @contextmanager
    def _timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def samples(self, samples: torch.Tensor) -> torch.Tensor:
        """This rank's share of the calibration samples: contiguous, sizes differing by at most one."""
        if self.size == 1:
            return samples
        return torch.tensor_split(samples, self.size)[self.rank]

    def all_reduce_stats(self, stats: dict) -> None:
        """Sum every :class:`InputStats` over the ranks (siblings that share one object are summed once)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        unique = list({id(s): s for s in stats.values()}.values())
        with self._timed():
            for s in unique:
                xtx = s.xtx.to(self.device)
                dist.all_reduce(xtx)
                s.xtx.copy_(xtx)
            tokens = torch.tensor([s.tokens for s in unique], dtype=torch.int64, device=self.device)
            dist.all_reduce(tokens)
            for s, n in zip(unique, tokens.tolist(), strict=True):
                s.tokens = n

    def plan(self, jobs: dict[str, Job]) -> Plan:
        """Which rank solves which rows of each layer (:func:`nmkit.oneshot.schedule.plan_block`)."""
        return plan_block(jobs, self.size)

    def share_rows(self, weights: dict[str, torch.Tensor], plan: Plan) -> None:
        """Broadcast each piece of each named (out, in) weight (in place, a view of the parameter is
        enough) from the rank that solved it: a whole layer is one piece, a row block one of several."""
        if self.size == 1:
            return
        import torch.distributed as dist

        with self._timed():
            for name in sorted(weights):
                for piece in plan[name]:
                    rows = weights[name][piece.start:piece.stop]
                    buf = rows.to(self.device).contiguous()  # a transposed weight's rows are strided
                    dist.broadcast(buf, src=piece.rank)
                    if buf.data_ptr() != rows.data_ptr():
                        rows.copy_(buf)

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        with self._timed():
            dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size == 1:
            return
        import torch.distributed as dist

        with self._timed():
            dist.barrier()


def from_environment(device: torch.device) -> Ranks:
    """The ranks torchrun started this process among (``WORLD_SIZE``/``RANK``), joined; one rank without them."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return Ranks(device=device)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A dead peer fails the others' next collective instead of hanging them for the default 30 minutes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return Ranks(rank, size, device)


def check_layout(ranks: Ranks, busiest: int, samples: int) -> None:
    """Refuse a split that leaves ranks idle: more ranks than the busiest block's plan gives work to
    (``busiest``: its layers, or more where row blocks cut them), or than calibration samples."""
    if ranks.size > busiest:
        raise UserError(f"--nproc {ranks.size} is more ranks than the pieces a block's solve shares out ({busiest}: "
                        f"its layers, cut into row blocks only for {', '.join(sorted(ROW_SEPARABLE_METHODS))} "
                        f"with row-wise patterns, and only where that shortens the block); use --nproc {busiest} "
                        "or fewer")
    if ranks.size > samples:
        raise UserError(f"--nproc {ranks.size} is more ranks than calibration samples ({samples}); "
                        f"raise --calib-samples to at least {ranks.size} or lower --nproc")
