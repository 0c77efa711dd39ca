"""Layer-sequential calibrated pruning with true error propagation, one block in memory, resumable.

Each block's calibration inputs are the outputs of the blocks before it *after* they were pruned.
Per block: one pass collects X^T X for its target layers, each layer is pruned, then a second pass
produces the pruned block's outputs for the next block. Only one block's activations are held.

After each block a checkpoint (pruned weights of that block, the next block's inputs, the results
so far) is committed by atomically replacing ``state.json``; ``resume=True`` continues from it and
gives bit-identical weights to an uninterrupted run (same machine, same thread count).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from nmkit.errors import UserError
from nmkit.oneshot.blocks import capture_block_inputs, find_blocks, run_block
from nmkit.oneshot.methods import METHODS, reconstruction_error
from nmkit.oneshot.permute import PermutationChange, permutable, permute_block
from nmkit.oneshot.results import LayerResult, PruneResult
from nmkit.oneshot.stats import StatsCollector
from nmkit.oneshot.targets import Target, find_targets
from nmkit.patterns import Pattern, PatternError, TailPolicy, check_tail, parse, summarize

STATE = "state.json"


def _out_in(target: Target) -> torch.Tensor:
    w = target.weight.detach()
    return w.T if target.reduce_dim == 0 else w


def _write_back(target: Target, w: torch.Tensor) -> None:
    weight = target.weight
    # + 0.0 turns the -0.0 of pruned negative weights into +0.0 (IEEE), so checkpoints hold one zero
    # and compressed round trips are bit exact
    weight.data.copy_((w.T if target.reduce_dim == 0 else w).to(weight.dtype) + 0.0)


def _group_by_block(targets: list[Target], prefix: str, count: int) -> list[list[Target]]:
    groups: list[list[Target]] = [[] for _ in range(count)]
    for t in targets:
        head = f"{prefix}." if prefix else ""
        rest = t.name[len(head):] if t.name.startswith(head) else None
        index = rest.split(".", 1)[0] if rest else None
        if index is None or not index.isdigit():
            raise UserError(f"layer {t.name} is outside the transformer blocks ({prefix}.N); calibrated methods "
                            f"prune block layers only: exclude it or use --method magnitude")
        groups[int(index)].append(t)
    return groups


class _Checkpoint:
    def __init__(self, directory: Path, config: dict):
        self.dir, self.config = directory, config

    def load(self) -> dict | None:
        path = self.dir / STATE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state["config"] != self.config:
            changed = sorted(k for k in self.config if state["config"].get(k) != self.config.get(k))
            raise UserError(f"checkpoint in {self.dir} was made with different settings ({', '.join(changed)}); "
                            f"rerun without --resume or with the original settings")
        return state

    def save(self, block: int, weights: dict[str, torch.Tensor], streams: dict[str, torch.Tensor],
             state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if weights:
            save_file({k: v.contiguous() for k, v in weights.items()}, self.dir / f"block-{block:04d}.safetensors")
        tmp = self.dir / "streams.pt.tmp"
        torch.save(streams, tmp)
        os.replace(tmp, self.dir / "streams.pt")
        tmp = self.dir / (STATE + ".tmp")
        tmp.write_text(json.dumps({"config": self.config, **state}))
        os.replace(tmp, self.dir / STATE)  # the commit point

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@torch.no_grad()
def prune_sequential(
    model: nn.Module,
    pattern: Pattern | str,
    method: str,
    samples: torch.Tensor,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    tail: TailPolicy = "error",
    options: dict | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    progress: bool = True,
    batch: int = 8,
    stop_after_block: int | None = None,
    permute: bool = False,
    permute_budget_s: float = 1.0,
) -> PruneResult:
    """Prune ``model`` in place block by block with calibration ``samples`` (K, L) token ids.

    ``options`` go to the method (e.g. ``blocksize``, ``damp`` for SparseGPT). ``run_config``
    (model, calibration source...) is stored in the checkpoint so a resume with other settings
    is refused. ``stop_after_block`` simulates a crash (tests). ``permute`` first permutes each
    block's absorbable input channels (see :mod:`nmkit.oneshot.permute`), ``permute_budget_s`` seconds
    of search per layer.
    """
    pattern = parse(pattern)
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    options = options or {}
    device = next(model.parameters()).device
    targets = find_targets(model, include, exclude)
    for t in targets:
        try:
            group = getattr(pattern, "group", None)
            if group:
                check_tail(_out_in(t).shape[1], group, tail)
        except PatternError as exc:
            raise UserError(f"layer {t.name} {list(t.weight.shape)}: {exc}") from None
    if permute and not permutable(pattern):
        raise UserError(f"--permute supports plain N:M patterns (e.g. 2:4, 4:8), not {pattern}")
    prefix, blocks = find_blocks(model)
    per_block = _group_by_block(targets, prefix, len(blocks))

    config = {"pattern": str(pattern), "method": method, "options": options, "include": include,
              "exclude": exclude, "tail": tail, "samples": list(samples.shape),
              "samples_sum": int(samples.long().sum()), "threads": torch.get_num_threads(),
              **({"permute": permute_budget_s} if permute else {}), **(run_config or {})}
    ckpt = _Checkpoint(Path(checkpoint_dir), config) if checkpoint_dir else None
    state = ckpt.load() if (ckpt and resume) else None
    result = PruneResult(str(pattern), method)
    start = time.perf_counter()

    if state is not None:
        first = state["next_block"]
        result.layers = [LayerResult(**x) for x in state["layers"]]
        result.permutations = [PermutationChange(**x) for x in state.get("permutations", [])]
        for i in range(first):
            if per_block[i]:
                # the whole block: a permutation also changed layers that are not targets
                blocks[i].load_state_dict(load_file(ckpt.dir / f"block-{i:04d}.safetensors"), strict=False)
        streams = torch.load(ckpt.dir / "streams.pt")
        hidden = streams["hidden"].to(device)
        _, kwargs = capture_block_inputs(model, blocks[0], samples[:1], device)
        prior_seconds = state["seconds"]
    else:
        first, prior_seconds = 0, 0.0
        hidden, kwargs = capture_block_inputs(model, blocks[0], samples, device)

    bar = tqdm(range(len(blocks)), desc=f"prune {pattern} ({method})", unit="block", disable=not progress,
               initial=first)
    for i in range(first, len(blocks)):
        block, block_targets = blocks[i], per_block[i]
        if block_targets:
            bins = 64 if METHODS[method].histograms else 0
            with StatsCollector(block_targets, histogram_bins=bins) as collector:
                for s in range(0, hidden.shape[0], batch):
                    collector.new_batch()
                    block(hidden[s : s + batch], **kwargs)
            if permute:
                result.permutations += permute_block(block, block_targets, collector.stats, pattern, method,
                                                     permute_budget_s, damp=options.get("damp", 0.01))
            for t in block_targets:
                stats = collector.stats[t.name]
                w_old = _out_in(t).float().clone()  # the weight itself is overwritten below
                w_new = METHODS[method].solve(w_old, stats, pattern, tail=tail, **options)
                _write_back(t, w_new)
                info = summarize(t.weight, pattern, dim=t.reduce_dim, tail=tail)
                result.layers.append(LayerResult(t.name, info["shape"], str(pattern), info["sparsity"],
                                                 info["valid"], reconstruction_error(w_old, w_new, stats)))
        hidden = run_block(block, hidden, kwargs, batch)
        if ckpt:
            weights = {k: v.detach().cpu() for k, v in block.state_dict().items()} if block_targets else {}
            streams = {"hidden": hidden.cpu()}
            ckpt.save(i, weights, streams, {"next_block": i + 1, "layers": [asdict(x) for x in result.layers],
                                            "permutations": [asdict(x) for x in result.permutations],
                                            "seconds": prior_seconds + time.perf_counter() - start})
        bar.update(1)
        if stop_after_block is not None and i == stop_after_block:
            bar.close()
            raise KeyboardInterrupt(f"stopped after block {i} (simulated interruption)")
    bar.close()
    result.seconds = prior_seconds + time.perf_counter() - start
    if ckpt:
        ckpt.remove()
    return result
