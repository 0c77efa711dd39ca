"""Layer-sequential calibrated pruning with true error propagation, one block in memory, resumable.

Each block's calibration inputs are the outputs of the blocks before it *after* they were pruned.
Per block: one pass collects X^T X for its target layers, each layer is pruned, then a second pass
produces the pruned block's outputs for the next block. Only one block's activations are held.

After each block a checkpoint (pruned weights of that block, the next block's inputs, the results
so far) is committed by atomically replacing ``state.json``; ``resume=True`` continues from it and
gives bit-identical weights to an uninterrupted run (same machine, same thread count).

The checkpoint is atomic as a set: a block's new files are written under names no commit refers to
yet, then ``state.json`` (the one commit record) is replaced; it lists every file with its SHA-256,
so a damaged or missing file is refused on resume instead of being half used. The record also holds
a content hash of the model's weights and the run's settings: resuming against other weights or
other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from nmkit import faults
from nmkit.errors import UserError
from nmkit.jsonout import dumps
from nmkit.oneshot.block_refit import refit_block
from nmkit.oneshot.blocks import capture_block_inputs, find_blocks, run_block
from nmkit.oneshot.distributed import Ranks, check_layout
from nmkit.oneshot.methods import METHODS, reconstruction_error
from nmkit.oneshot.model_refit import progress_line, refit_model
from nmkit.oneshot.permute import PermutationChange, permutable, permute_block
from nmkit.oneshot.results import LayerResult, PruneResult
from nmkit.oneshot.schedule import Job, busy_ranks, row_separable
from nmkit.oneshot.stats import InputStats, collect_block_stats
from nmkit.oneshot.targets import Target, check_prunable, find_targets
from nmkit.outputs import write_failure
from nmkit.patterns import Pattern, PatternError, TailPolicy, check_tail, parse, summarize

STATE = "state.json"


def _out_in(target: Target) -> torch.Tensor:
    w = target.weight.detach()
    return w.T if target.reduce_dim == 0 else w


def _write_back(target: Target, w: torch.Tensor, start: int = 0) -> None:
    """Write ``w`` (out, in) into the weight, or into its rows [start, start + len(w)) (a row block)."""
    # + 0.0 turns the -0.0 of pruned negative weights into +0.0 (IEEE), so checkpoints hold one zero
    # and compressed round trips are bit exact
    _out_in(target)[start:start + w.shape[0]].copy_(w.to(target.weight.dtype) + 0.0)


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


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model`` (name, dtype, shape, bytes): which weights a checkpoint came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _write_durably(path: Path, write) -> None:
    """``write(tmp)`` then fsync and rename to ``path``: a file under its final name is always complete."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _Checkpoint:
    """Across ranks: each rank writes its own activations (``streams-B-rR.pt``), the leader writes the block's
    weights and commits every rank's file with the one ``state.json`` rename."""

    def __init__(self, directory: Path, config: dict, ranks: Ranks | None = None):
        self.dir, self.config = directory, config
        self.ranks = ranks or Ranks()
        self.files: dict[str, str] = {}  # file name -> SHA-256, as the last commit recorded them

    def _damaged(self, what: str) -> UserError:
        return UserError(f"checkpoint {self.dir} is damaged ({what}); delete it and rerun without --resume "
                         f"(the blocks done so far are lost)")

    def load(self) -> dict | None:
        path = self.dir / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            config, files = state["config"], state["files"]
            int(state["next_block"])
        except (ValueError, KeyError, TypeError) as exc:
            raise self._damaged(f"{STATE} is unreadable: {type(exc).__name__}: {exc}") from None
        if config != self.config:
            changed = sorted(k for k in {*self.config, *config} if config.get(k) != self.config.get(k))
            what = ", ".join("the model weights (their content hash)" if k == "weights" else k for k in changed)
            raise UserError(f"checkpoint in {self.dir} was made with different settings ({what}); "
                            f"rerun without --resume (after deleting {self.dir}) or with the original model "
                            "and settings")
        for name, digest in files.items():
            f = self.dir / name
            if not f.is_file():
                raise self._damaged(f"{name} is missing")
            if _file_sha256(f) != digest:
                raise self._damaged(f"{name} does not match the SHA-256 its commit recorded")
        self.files = dict(files)
        return state

    def load_block(self, block: int) -> dict[str, torch.Tensor]:
        name = f"block-{block:04d}.safetensors"
        if name not in self.files:
            raise self._damaged(f"{STATE} does not list {name}")
        return load_file(self.dir / name)

    def load_streams(self, state: dict) -> dict[str, torch.Tensor]:
        names = state["streams"]
        return torch.load(self.dir / (names if isinstance(names, str) else names[self.ranks.rank]))

    def _streams_name(self, block: int) -> str:
        return f"streams-{block:04d}.pt" if self.ranks.size == 1 else f"streams-{block:04d}-r{self.ranks.rank}.pt"

    def save(self, block: int, weights: dict[str, torch.Tensor], streams: dict[str, torch.Tensor],
             state: dict) -> None:
        """Write block ``block``'s files under new names, then commit them with one ``state.json`` rename."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            files = dict(self.files)
            if weights and self.ranks.leader:
                name = f"block-{block:04d}.safetensors"
                _write_durably(self.dir / name, lambda p: save_file({k: v.contiguous() for k, v in weights.items()},
                                                                   p))
                files[name] = _file_sha256(self.dir / name)
            faults.point(f"between-files-{block}")
            streams_name = self._streams_name(block)
            _write_durably(self.dir / streams_name, lambda p: torch.save(streams, p))
            every = self.ranks.gather_objects((streams_name, _file_sha256(self.dir / streams_name)))
            files = {k: v for k, v in files.items() if not k.startswith("streams-")}
            files.update(every)
            faults.point(f"before-commit-{block}")
            if self.ranks.leader:
                names = every[0][0] if self.ranks.size == 1 else [n for n, _ in every]
                record = {"config": self.config, **state, "streams": names, "files": files}
                _write_durably(self.dir / STATE, lambda p: p.write_text(dumps(record)))  # the commit point
            self.ranks.barrier()  # no rank deletes what the last commit listed before the new one is in place
        except Exception as exc:
            failure = write_failure(exc)
            if failure is None:
                raise
            raise UserError(f"cannot write the checkpoint in {self.dir}: {failure}; the last committed block is "
                            "kept: free space (or fix the path) and rerun the same command with --resume") from None
        for old in set(self.files) - set(files):  # superseded streams: no commit refers to them any more
            if self.ranks.size == 1 or old.endswith(f"-r{self.ranks.rank}.pt"):  # each rank removes its own
                (self.dir / old).unlink(missing_ok=True)
        self.files = files

    def remove(self) -> None:
        import shutil

        self.ranks.barrier()  # every rank is past its last read of the checkpoint
        if self.ranks.leader:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.ranks.barrier()


def check_distributable(ranks: Ranks, per_block: list[list[Target]], samples: torch.Tensor, method: str,
                        permute: bool, pattern: Pattern | None = None,
                        per_layer: dict[str, Pattern] | None = None) -> None:
    """What a run over several ranks cannot do, refused before any work. ``pattern`` None: layers are
    counted whole (no row blocks)."""
    if ranks.size == 1:
        return
    if METHODS[method].histograms:
        raise UserError(f"--method {method} keeps per-rank value histograms that are not merged across ranks; "
                        "run it with --nproc 1")
    if permute:
        raise UserError("--permute searches within a time budget, so ranks would disagree; run it with --nproc 1")
    if METHODS[method].block_refit:
        raise UserError(f"--method {method} trains each block on all calibration windows, which ranks do not share; "
                        "run it with --nproc 1")
    if pattern is None:
        busiest = max((len(b) for b in per_block), default=1)
    else:
        busiest = max((busy_ranks(ranks.plan(solve_jobs(b, method, pattern, per_layer))) for b in per_block if b),
                      default=1)
    check_layout(ranks, busiest, samples.shape[0])


def solve_jobs(targets: list[Target], method: str, pattern: Pattern,
               per_layer: dict[str, Pattern] | None = None) -> dict[str, Job]:
    """Each target's solve as the scheduler sees it (:mod:`nmkit.oneshot.schedule`).

    OBS/refit methods: out x in^2 for the sweep, plus in^3 / 2 for the damped Hessian's factorisation that
    every piece of a cut layer repeats (on this CPU the in = 1536 factorisation took 0.32 s against 0.23 s
    for the 576-row sweep: about half the sweep's time per unit). Score-only methods: out x in.
    """
    obs = METHODS[method].updates_weights
    jobs = {}
    for t in targets:
        out, inp = _out_in(t).shape
        jobs[t.name] = Job(out, inp * inp if obs else inp, inp**3 / 2 if obs else 0.0,
                           row_separable(method, (per_layer or {}).get(t.name, pattern)))
    return jobs


def solve_shared(targets: list[Target], stats: dict[str, InputStats] | None, pattern: Pattern, method: str,
                 tail: TailPolicy, options: dict, ranks: Ranks, index: int,
                 per_layer: dict[str, Pattern] | None = None) -> list[LayerResult]:
    """Solve ``targets`` in place, shared out across the ranks by the block's plan, and return their results
    (in target order) on every rank. ``stats`` None: a data-free method (no reconstruction error)."""
    per_layer = per_layer or {}
    plan = ranks.plan(solve_jobs(targets, method, pattern, per_layer))
    mine: dict[str, LayerResult] = {}
    before: dict[str, torch.Tensor] = {}  # cut layers this rank reports once their rows are assembled

    def result(t: Target, w_old: torch.Tensor) -> LayerResult:
        layer_pattern = per_layer.get(t.name, pattern)
        info = summarize(t.weight, layer_pattern, dim=t.reduce_dim, tail=tail)
        error = reconstruction_error(w_old, _out_in(t).float(), stats[t.name]) if stats else None
        return LayerResult(t.name, info["shape"], str(layer_pattern), info["sparsity"], info["valid"], error)

    for t in targets:
        pieces = [p for p in plan[t.name] if p.rank == ranks.rank]
        if not pieces:
            continue
        reports = plan[t.name][0].rank == ranks.rank  # the rank of a layer's first piece reports it
        w_old = _out_in(t).float().clone() if reports else None  # the weight itself is overwritten below
        for p in pieces:
            rows = w_old[p.start:p.stop] if reports else _out_in(t)[p.start:p.stop].float().clone()
            try:
                w_new = METHODS[method].solve(rows, stats[t.name] if stats else None, per_layer.get(t.name, pattern),
                                              tail=tail, **options)
            except PatternError as exc:  # e.g. NaN scores from overflowing activations
                raise UserError(f"layer {t.name}: {exc}") from None
            _write_back(t, w_new, p.start)
        faults.point(f"mid-block-{index}")
        if len(plan[t.name]) == 1:
            mine[t.name] = result(t, w_old)
        elif reports:
            before[t.name] = w_old
    ranks.share_rows({t.name: _out_in(t) for t in targets}, plan)
    mine |= {t.name: result(t, before[t.name]) for t in targets if t.name in before}
    solved = {k: v for part in ranks.gather_objects(mine) for k, v in part.items()}
    return [solved[t.name] for t in targets]


@torch.no_grad()
def prune_block(block: nn.Module, block_targets: list[Target], hidden: torch.Tensor, kwargs: dict,
                pattern: Pattern, method: str, tail: TailPolicy, options: dict, batch: int, ranks: Ranks,
                index: int, permute: bool = False, permute_budget_s: float = 1.0,
                per_layer: dict[str, Pattern] | None = None,
                ) -> tuple[list[LayerResult], list[PermutationChange]]:
    """Prune one block's targets in place from its calibration inputs ``hidden`` (this rank's share).

    Statistics are summed over the ranks, each layer (or row block of one) is solved by one rank and
    broadcast to the others; with one rank this is the plain loop. ``per_layer``: layer name -> its own
    pattern (a per-layer plan). Returns the layers' results (in target order) and permutations.
    """
    bins = 64 if METHODS[method].histograms else 0
    block_stats = collect_block_stats(block, block_targets, hidden, kwargs, batch, histogram_bins=bins)
    ranks.all_reduce_stats(block_stats)
    permutations = []
    if permute:
        permutations = permute_block(block, block_targets, block_stats, pattern, method, permute_budget_s,
                                     damp=options.get("damp", 0.01))
    for t in block_targets:
        if not bool(torch.isfinite(block_stats[t.name].xtx).all()):
            raise UserError(f"layer {t.name}: its calibration inputs contain NaN or Inf (a layer before "
                            "it produces non-finite activations); check the model's weights, or prune "
                            "with --method magnitude")
    layers = solve_shared(block_targets, block_stats, pattern, method, tail, options, ranks, index, per_layer)
    return layers, permutations


@torch.no_grad()
def _fit_whole_model(model, blocks, per_block, samples, dense, device, options, result, progress) -> None:
    """The last stage of *-block methods with ``model_epochs``: every block fitted at once (model_refit.py).

    Runs after the last block's checkpoint, so an interrupted fit is redone whole on ``--resume``. Single
    process, like the block fits (``check_distributable`` refuses several ranks for *-block methods).
    """
    inputs, kwargs = capture_block_inputs(model, blocks[0], samples, device)  # embeddings: pruning kept them
    targets = [t for block_targets in per_block for t in block_targets]
    log = progress_line if progress else None
    fit = refit_model(model, blocks, targets, inputs, dense, kwargs, epochs=options["model_epochs"],
                      lr=options.get("model_lr", 1e-4), log=log)
    result.model_refit = {"objective": fit.objective, "before": fit.loss_before, "after": fit.loss_after,
                          "steps": fit.steps}


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
    keep_checkpoint: bool = False,
    ranks: Ranks | None = None,
    layer_patterns: dict[str, Pattern | str] | None = None,
) -> PruneResult:
    """Prune ``model`` in place block by block with calibration ``samples`` (K, L) token ids.

    ``options`` go to the method (e.g. ``blocksize``, ``damp`` for SparseGPT). ``run_config``
    (model, calibration source...) is stored in the checkpoint so a resume with other settings
    is refused. ``stop_after_block`` simulates a crash (tests). ``permute`` first permutes each
    block's absorbable input channels (see :mod:`nmkit.oneshot.permute`), ``permute_budget_s`` seconds
    of search per layer. The checkpoint is removed at the end unless ``keep_checkpoint`` (the CLI keeps
    it until the output is saved, so a failed save loses nothing). Without ``resume`` an existing
    checkpoint in ``checkpoint_dir`` is replaced. ``ranks`` spreads the run over torch.distributed
    processes (:mod:`nmkit.oneshot.distributed`): each calibrates on its share of ``samples``.
    ``layer_patterns``: layer name -> pattern for layers that take another pattern than ``pattern``
    (a per-layer plan, pruned in the same single pass).
    """
    pattern = parse(pattern)
    per_layer = {name: parse(p) for name, p in (layer_patterns or {}).items()}
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    options = options or {}
    device = next(model.parameters()).device
    targets = find_targets(model, include, exclude)
    check_prunable(model, targets)
    for t in targets:
        try:
            group = getattr(per_layer.get(t.name, pattern), "group", None)
            if group:
                check_tail(_out_in(t).shape[1], group, tail)
        except PatternError as exc:
            raise UserError(f"layer {t.name} {list(t.weight.shape)}: {exc}") from None
    if permute and per_layer:
        raise UserError("--permute is not supported with per-layer patterns (a plan)")
    if permute and not permutable(pattern):
        raise UserError(f"--permute supports plain N:M patterns (e.g. 2:4, 4:8), not {pattern}")
    prefix, blocks = find_blocks(model)
    per_block = _group_by_block(targets, prefix, len(blocks))
    ranks = ranks or Ranks()
    check_distributable(ranks, per_block, samples, method, permute, pattern, per_layer)

    config = {"pattern": str(pattern), "method": method, "options": options, "include": include,
              "exclude": exclude, "tail": tail, "samples": list(samples.shape),
              **({"layer_patterns": {k: str(v) for k, v in per_layer.items()}} if per_layer else {}),
              "samples_sum": int(samples.long().sum()), "threads": torch.get_num_threads(),
              **({"permute": permute_budget_s} if permute else {}), **(run_config or {})}
    if ranks.size > 1:
        config["ranks"] = ranks.size  # each rank's activations are its own share: resume with as many
    samples = ranks.samples(samples)
    ckpt = None
    if checkpoint_dir:
        config["weights"] = weights_fingerprint(model)
        ckpt = _Checkpoint(Path(checkpoint_dir), config, ranks)
        if not resume:
            ckpt.remove()
    state = ckpt.load() if (ckpt and resume) else None
    result = PruneResult(str(pattern), method)
    start = time.perf_counter()

    if state is not None:
        first = state["next_block"]
        result.layers = [LayerResult(**x) for x in state["layers"]]
        result.permutations = [PermutationChange(**x) for x in state.get("permutations", [])]
        result.blocks = list(state.get("blocks", []))
        for i in range(first):
            if per_block[i]:
                # the whole block: a permutation also changed layers that are not targets
                blocks[i].load_state_dict(ckpt.load_block(i), strict=False)
        streams = ckpt.load_streams(state)
        hidden = streams["hidden"].to(device)
        dense = streams["dense"].to(device) if "dense" in streams else None
        _, kwargs = capture_block_inputs(model, blocks[0], samples[:1], device)
        prior_seconds = state["seconds"]
    else:
        first, prior_seconds = 0, 0.0
        hidden, kwargs = capture_block_inputs(model, blocks[0], samples, device)
        dense = hidden.clone() if METHODS[method].block_refit else None  # the dense model's stream: the target

    label = "per-layer plan" if per_layer else str(pattern)
    bar = tqdm(range(len(blocks)), desc=f"prune {label} ({method})", unit="block",
               disable=not progress or not ranks.leader, initial=first)
    try:  # the bar is closed before an error is printed, so the error stays the last line
        for i in range(first, len(blocks)):
            block, block_targets = blocks[i], per_block[i]
            dense_out = run_block(block, dense, kwargs, batch) if dense is not None else None
            if block_targets:
                layers, permutations = prune_block(block, block_targets, hidden, kwargs, pattern, method, tail,
                                                   options, batch, ranks, i, permute, permute_budget_s,
                                                   per_layer)
                if dense_out is not None:
                    fit = refit_block(block, block_targets, hidden, dense_out, kwargs,
                                      epochs=options.get("block_epochs", 4), lr=options.get("block_lr", 1e-3),
                                      seed=i)
                    result.blocks.append({"block": i, "output_mse_before": fit.loss_before,
                                          "output_mse_after": fit.loss_after})
                result.layers += layers
                result.permutations += permutations
            hidden, dense = run_block(block, hidden, kwargs, batch), dense_out
            if ckpt:
                weights = {k: v.detach().cpu() for k, v in block.state_dict().items()} if block_targets else {}
                streams = {"hidden": hidden.cpu(), **({"dense": dense.cpu()} if dense is not None else {})}
                ckpt.save(i, weights, streams, {"next_block": i + 1, "layers": [asdict(x) for x in result.layers],
                                                "permutations": [asdict(x) for x in result.permutations],
                                                "blocks": result.blocks,
                                                "seconds": prior_seconds + time.perf_counter() - start})
                faults.point(f"after-commit-{i}")
            bar.update(1)
            if stop_after_block is not None and i == stop_after_block:
                raise KeyboardInterrupt(f"stopped after block {i} (simulated interruption)")
    finally:
        bar.close()
    if dense is not None and options.get("model_epochs", 0) > 0:
        _fit_whole_model(model, blocks, per_block, samples, dense, device, options, result, progress)
    result.seconds = prior_seconds + time.perf_counter() - start
    if ckpt and not keep_checkpoint:
        ckpt.remove()
    return result
