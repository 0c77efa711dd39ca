"""Streamed pruning (one block in memory) and torch.distributed pruning (2 and 3 gloo ranks) on the tiny Llama.

- a streamed prune writes the same tensors, bit for bit, as the in-memory prune;
- 2 and 3 ranks give the same masks as one for magnitude, wanda, sparsegpt and admm, and the same weights
  (sparsegpt's and admm's to float32 rounding: X^T X is summed per sample in float64, so the ranks' split
  barely changes it); 7 samples split 4 + 3 and 3 + 2 + 2, a block's 7 layers over 3 ranks, 3 layers
  on 3 ranks (as many ranks as pieces);
- row blocks: a layer cut across 2 or 3 ranks gives the weights of one process bit for bit; the methods listed
  as row-separable are (a row slice's solve is that slice of the whole solve), and no other is ever cut;
- bad input: a missing shard, more ranks than a block has pieces to solve, a rank killed mid-run: one line,
  nothing half-written, and ``--resume`` finishes the run.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from nmkit.cli import main
from nmkit.oneshot.distributed import Ranks
from nmkit.oneshot.methods import METHODS as ALL_METHODS
from nmkit.oneshot.schedule import ROW_SEPARABLE_METHODS, busy_ranks, plan_block
from nmkit.oneshot.sequential import solve_jobs
from nmkit.oneshot.stats import InputStats
from nmkit.oneshot.streaming import prune_streaming
from nmkit.oneshot.targets import find_targets
from nmkit.patterns import parse

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
# (method, --include, pattern): whole layers shared out, then blocks whose dominant layer the plan cuts into
# row blocks (down_proj alone: 1 layer cut in 2 or 3; sparsegpt with o_proj: a cut layer beside a whole one;
# wanda with o_proj: both cut), then 3 layers a transposable pattern keeps whole (3 ranks: one layer each)
CASES = [(m, None, "2:4") for m in METHODS] + [(m, ["*down_proj"], "2:4") for m in METHODS] + [
    ("sparsegpt", ["*down_proj", "*o_proj"], "2:4"), ("wanda", ["*down_proj", "*o_proj"], "2:4"),
    ("wanda", ["*q_proj", "*k_proj", "*v_proj"], "2:4T")]


def _case_dir(method: str, include: list[str] | None, pattern: str) -> str:
    return method + ("-" + "-".join(p.strip("*") for p in include) if include else "") + "-" + pattern.replace(":", "")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _argv(model: Path, data: Path, out: Path, method: str = "wanda", *extra: str) -> list[str]:
    return ["prune", str(model), "--method", method, "--calib-samples", "4", "--calib-seqlen", "32", "--no-eval",
            "--data-dir", str(data), "--out", str(out), "--json", *extra]


@pytest.fixture(scope="module")
def sharded_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama re-saved as several safetensors shards (an index), as large checkpoints come."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(out, max_shard_size="60KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_streamed_prune_matches_the_in_memory_prune(method, sharded_model, tiny_data_dir, tmp_path):
    assert main(_argv(sharded_model, tiny_data_dir, tmp_path / "whole", method)) == 0
    assert main(_argv(sharded_model, tiny_data_dir, tmp_path / "streamed", method, "--stream")) == 0
    whole, streamed = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert whole.keys() == streamed.keys()
    for name in whole:
        assert whole[name].equal(streamed[name]), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed", "whole"]  # no checkpoint left behind
    assert (tmp_path / "streamed" / "nmkit.json").is_file()


def test_missing_shard_is_one_line_and_writes_nothing(sharded_model, tiny_data_dir, tmp_path, capsys):
    broken = tmp_path / "model"
    broken.mkdir()
    shards = sorted(sharded_model.glob("*.safetensors"))
    for f in sharded_model.iterdir():
        if f != shards[1]:
            (broken / f.name).symlink_to(f)
    out = tmp_path / "out"
    assert main(_argv(broken, tiny_data_dir, out, "wanda", "--stream")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert shards[1].name in err[-1] and "missing" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _calibration() -> torch.Tensor:  # 7 samples: uneven shares on 2 ranks (4 + 3) and 3 (3 + 2 + 2)
    return torch.randint(0, 384, (7, 32), generator=torch.Generator().manual_seed(0))


def _rank(rank: int, world: int, port: int, model: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks = Ranks(rank, world)
        for method, include, pattern in CASES:
            samples = _calibration() if method != "magnitude" else None
            prune_streaming(model, pattern, method, samples, Path(root) / _case_dir(method, include, pattern),
                            include=include, progress=False, ranks=ranks)
    finally:
        dist.destroy_process_group()


def _blocks(checkpoint: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(checkpoint.glob("block-*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])  # 3 ranks: ~23 s on 2 cores
def test_gloo_ranks_give_the_masks_of_one(world, sharded_model, tmp_path):
    mp.spawn(_rank, args=(world, _free_port(), str(sharded_model), str(tmp_path / "ranks")), nprocs=world)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        _compare_with_one_rank(sharded_model, tmp_path, world)
    finally:
        torch.set_num_threads(threads)


def _compare_with_one_rank(sharded_model: Path, tmp_path: Path, world: int) -> None:
    for method, include, pattern in CASES:
        samples = _calibration() if method != "magnitude" else None
        name = _case_dir(method, include, pattern)
        result, _, _ = prune_streaming(sharded_model, pattern, method, samples, tmp_path / "one" / name,
                                       include=include, progress=False)
        one, many = _blocks(tmp_path / "one" / name), _blocks(tmp_path / "ranks" / name)
        assert one.keys() == many.keys() and len(result.layers) == 2 * (len(include) if include else 7)
        pruned = [k for k in one if k.endswith("proj.weight")]
        same = sum(int(((one[k] != 0) == (many[k] != 0)).sum()) for k in pruned)
        total = sum(one[k].numel() for k in pruned)
        assert same == total, (name, same / total)  # summed in float32, sparsegpt's differed (99.995%)
        for k in one:  # magnitude and wanda keep the original weights; the updates agree to rounding
            if ALL_METHODS[method].updates_weights and not include:
                torch.testing.assert_close(one[k], many[k], msg=k)
            else:  # a cut layer's rows are solved alone: the same floats, in the same order
                assert one[k].equal(many[k]), (name, k)
        # every rank wrote its own activations, the leader committed them all
        assert len(list((tmp_path / "ranks" / name).glob("streams-*-r*.pt"))) == world


def _tiny_targets(sharded_model: Path, include: list[str]):
    from transformers import AutoModelForCausalLM

    return find_targets(AutoModelForCausalLM.from_pretrained(sharded_model).model.layers[0], include)


def test_the_row_block_cases_cut_down_proj_across_both_ranks(sharded_model):
    """What the 2-rank test exercises: down_proj's rows are solved half by each rank."""
    for method, include, pattern in CASES:
        plan = plan_block(solve_jobs(_tiny_targets(sharded_model, include or ["*"]), method, parse(pattern)), 2)
        if include and "*down_proj" in include:
            down = plan["mlp.down_proj"]
            assert [(p.rank, p.start, p.stop) for p in down] == [(0, 0, 32), (1, 32, 64)], (method, plan)
        else:  # 7 layers on 2 ranks: whole layers already balance the block; 2:4T couples rows
            assert all(len(pieces) == 1 for pieces in plan.values()), (method, plan)


def _pieces(plan) -> dict[str, list[tuple[int, int, int]]]:
    return {name.split(".")[-1]: [(p.rank, p.start, p.stop) for p in pieces] for name, pieces in plan.items()}


def test_what_the_three_rank_cases_exercise(sharded_model):
    """3 ranks: uneven row blocks (64 rows as 21 + 21 + 22), a cut layer beside whole ones, one layer a rank."""
    def plan(method, include, pattern="2:4"):
        return _pieces(plan_block(solve_jobs(_tiny_targets(sharded_model, include), method, parse(pattern)), 3))

    for method in METHODS:
        assert plan(method, ["*down_proj"])["down_proj"] == [(1, 0, 21), (2, 21, 42), (0, 42, 64)], method
    assert plan("sparsegpt", ["*"])["down_proj"] == [(0, 0, 32), (1, 32, 64)]  # 7 layers, one of them cut
    assert sum(len(p) for p in plan("wanda", ["*"]).values()) == 7  # 7 whole layers balance 3 ranks
    edge = plan("wanda", ["*q_proj", "*k_proj", "*v_proj"], "2:4T")
    assert sorted(r for pieces in edge.values() for r, _, _ in pieces) == [0, 1, 2]  # as many ranks as layers


def test_a_longest_piece_that_cannot_be_cut_does_not_stop_the_search(sharded_model):
    """down_proj (64 x 128) cut as far as the ranks allow ties with the whole o_proj (64 x 64): the search
    went on by cutting o_proj (it stopped there, and 4 ranks were refused with one left idle)."""
    targets = _tiny_targets(sharded_model, ["*down_proj", "*o_proj"])
    for size in (2, 4):
        plan = plan_block(solve_jobs(targets, "wanda", parse("2:4")), size)
        assert len(plan["self_attn.o_proj"]) > 1 and busy_ranks(plan) == size, (size, _pieces(plan))


@pytest.mark.parametrize("method", sorted(ROW_SEPARABLE_METHODS))
@pytest.mark.parametrize("pattern", ["2:4", "50%"])
def test_a_row_slice_solves_as_in_the_whole_layer(method, pattern):
    """The claim behind ROW_SEPARABLE_METHODS: rows [a, b) solved alone are rows [a, b) of the whole solve."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 48, generator=gen) * torch.rand(48, generator=gen)  # channels of unequal scale
    stats = InputStats((x.T @ x).double(), 256)
    w = torch.randn(40, 48, generator=gen)
    solve = ALL_METHODS[method].solve
    whole = solve(w.clone(), stats, parse(pattern))
    parts = [solve(w[a:b].clone(), stats, parse(pattern)) for a, b in [(0, 13), (13, 40)]]
    assert torch.cat(parts).equal(whole)
    assert not whole.equal(w)  # something was pruned


def test_methods_not_row_separable_are_never_cut(sharded_model):
    targets = _tiny_targets(sharded_model, ["*down_proj"])
    # the control: sparsegpt 2:4 on one layer over 4 ranks is cut
    assert len(plan_block(solve_jobs(targets, "sparsegpt", parse("2:4")), 4)["mlp.down_proj"]) > 1
    others = sorted(set(ALL_METHODS) - ROW_SEPARABLE_METHODS)
    assert others and ROW_SEPARABLE_METHODS <= set(ALL_METHODS)
    cases = [(m, "2:4") for m in others] + [(m, p) for m in ROW_SEPARABLE_METHODS for p in ("2:4T", "4:2:4")]
    for method, pattern in cases:  # transposable and V:N:M groups span rows
        plan = plan_block(solve_jobs(targets, method, parse(pattern)), 4)
        assert [(p.start, p.stop) for p in plan["mlp.down_proj"]] == [(0, 64)], (method, pattern)


def _torchrun_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def test_more_ranks_than_pieces_is_refused(sharded_model, tiny_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    out = tmp_path / "out"
    # one layer a block, and a transposable pattern couples rows: no row blocks, one rank would idle
    code = main(_argv(sharded_model, tiny_data_dir, out, "wanda", "--nproc", "2", "--include", "*down_proj",
                      "--pattern", "2:4T"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "more ranks than the pieces a block's solve shares out (1" in err[-1], err
    assert len([line for line in err if "error" in line]) == 1  # both ranks refused; the launcher said it once
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device is seen")
def test_cuda_without_a_cuda_device_is_one_line(sharded_model, tiny_data_dir, tmp_path, capsys):
    """--device cuda (NCCL across ranks) on a machine without CUDA: refused before any worker starts."""
    for flag in (["--stream"], ["--nproc", "2"]):
        code = main(_argv(sharded_model, tiny_data_dir, tmp_path / "out", "wanda", "--device", "cuda", *flag))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == ["nmkit prune: error: --device cuda was requested but this torch build sees no "
                                     "CUDA device"], (flag, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("nproc", ["2", "3"])
def test_rank_killed_mid_run_then_resume(nproc, sharded_model, tiny_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    whole = tmp_path / "whole"
    assert main(_argv(sharded_model, tiny_data_dir, whole, "sparsegpt", "--nproc", nproc)) == 0
    out = tmp_path / "out"
    monkeypatch.setenv("NMKIT_FAULT", "after-commit-0")
    monkeypatch.setenv("NMKIT_FAULT_RANK", str(int(nproc) - 1))  # the last rank
    code = main(_argv(sharded_model, tiny_data_dir, out, "sparsegpt", "--nproc", nproc))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "died" in err[-1] and "--resume" in err[-1], err
    assert not out.exists() and (tmp_path / "out.nmkit-ckpt" / "state.json").is_file()
    monkeypatch.delenv("NMKIT_FAULT")
    assert main(_argv(sharded_model, tiny_data_dir, out, "sparsegpt", "--nproc", nproc, "--resume")) == 0
    a, b = _tensors(whole), _tensors(out)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # same ranks, same threads: bit-identical
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "whole"]
