"""DDP: two CPU processes (gloo) give the same masks and weights as one process on the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nmkit.training import SparseTraining

STEPS = 8
GLOBAL_BATCH = 16


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 16, generator=g)
    return x, x[:, :4] * 2 - x[:, 4:8]


def _train(rank: int, world: int) -> dict[str, torch.Tensor]:
    model = _model()
    sparse = SparseTraining(model, "2:4", method="srste", masked_decay=1e-2, exclude=("4",))
    net = DistributedDataParallel(model) if world > 1 else model
    opt = sparse.wrap(torch.optim.AdamW(model.parameters(), lr=3e-2))
    x, y = _batch()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    flips = []
    for _ in range(STEPS):
        # mean over the local shard; DDP averages gradients, so this equals the global-batch mean loss
        nn.functional.mse_loss(net(xs), ys).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        flips.append(sparse.flip_rate()["overall"])
    out = {f"mask.{layer.name}": layer.param.mask.clone() for layer in sparse.layers}
    sparse.finalize()
    out.update({f"weight.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    out["flips"] = torch.tensor(flips)
    return out


def _worker(rank: int, world: int, init_file: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = _train(rank, world)
        torch.save(out, f"{result_path}.{rank}")
        # both ranks finish before either tears down the group: a rank destroying it while the
        # other still talks to the file store aborts the other ("terminate called ...")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    result = str(tmp_path / "ddp.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), result), nprocs=2, join=True)
    single = _train(0, 1)
    assert single["flips"].sum() > 0  # masks did move, so equality below is not trivial
    for rank in (0, 1):
        ddp = torch.load(f"{result}.{rank}")
        assert ddp.keys() == single.keys()
        for key, ref in single.items():
            if key.startswith("mask."):
                assert torch.equal(ddp[key], ref), (rank, key)
            else:
                torch.testing.assert_close(ddp[key], ref, atol=1e-5, rtol=1e-4, msg=f"rank {rank} {key}")
