"""The collective steps of a pruning run spread over processes (torch.distributed), and their one-process no-ops.

Every rank runs the same block loop on its own share of the calibration samples. Per block:

1. each rank collects X^T X (and token counts) of its samples; :meth:`Ranks.all_reduce_stats` sums them,
   so every rank then holds the statistics of all samples;
2. :meth:`Ranks.owners` shares the block's target layers out (largest solve first, to the least loaded
   rank); each rank solves its own;
3. :meth:`Ranks.share_weights` broadcasts each solved weight from its owner, so every rank holds the
   whole pruned block before it propagates its samples through it.

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

    def owners(self, costs: dict[str, float]) -> dict[str, int]:
        """Which rank solves each layer: longest first to the least loaded rank (ties by name, then rank)."""
        load = [0.0] * self.size
        owner = {}
        for name, cost in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
            r = min(range(self.size), key=lambda i: (load[i], i))
            owner[name] = r
            load[r] += cost
        return owner

    def share_weights(self, weights: dict[str, torch.Tensor], owner: dict[str, int]) -> None:
        """Broadcast each named weight (in place) from the rank that solved it."""
        if self.size == 1:
            return
        import torch.distributed as dist

        with self._timed():
            for name in sorted(weights):
                w = weights[name]
                buf = w.data.to(self.device).contiguous()
                dist.broadcast(buf, src=owner[name])
                if buf.data_ptr() != w.data.data_ptr():
                    w.data.copy_(buf)

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


def check_layout(ranks: Ranks, layers_per_block: int, samples: int) -> None:
    """Refuse a split that leaves ranks idle: more ranks than a block has layers to solve, or than samples."""
    if ranks.size > layers_per_block:
        raise UserError(f"--nproc {ranks.size} is more ranks than the layers a block shares out for the solve "
                        f"({layers_per_block}); use --nproc {layers_per_block} or fewer")
    if ranks.size > samples:
        raise UserError(f"--nproc {ranks.size} is more ranks than calibration samples ({samples}); "
                        f"raise --calib-samples to at least {ranks.size} or lower --nproc")
