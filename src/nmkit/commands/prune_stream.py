"""``nmkit prune --stream`` (one block in memory) and ``nmkit prune --nproc K`` (K torch.distributed ranks).

``--nproc K`` starts K workers with torchrun (``python -m torch.distributed.run``, gloo on CPU, NCCL on
CUDA); each worker runs :func:`run_streamed` on the same settings, passed as a JSON file. The launcher
passes on the workers' own ``nmkit`` lines (deduplicated: every rank refuses bad input with the same
line) and turns a worker's death into one line that points at ``--resume``. A run started by hand
with ``torchrun --nproc-per-node K -m nmkit.commands.prune_stream SETTINGS.json`` works the same way.

The streamed prune writes sharded safetensors (the checkpoint's pruned blocks, hard-linked), the
sidecar and a report; it does not evaluate (the model may not fit in memory): run ``nmkit eval OUT``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from nmkit import calibration as calibration_set
from nmkit import faults, models, preflight, resume, sidecar
from nmkit.errors import UserError
from nmkit.jsonout import dumps
from nmkit.oneshot.distributed import Ranks, from_environment
from nmkit.oneshot.methods import METHODS
from nmkit.oneshot.streaming import SafetensorsDir, prune_streaming, write_streamed_model
from nmkit.outputs import atomic_directory, check_output_dir, write_failure
from nmkit.patterns import parse
from nmkit.report import machine, now, prune_markdown


def _log(msg: str) -> None:
    print(f"nmkit: {msg}", file=sys.stderr, flush=True)


def _check_flags(args: argparse.Namespace) -> None:
    unsupported = [flag for flag, on in (("--recipe", args.recipe), ("--quant", args.quant is not None),
                                         ("--permute", args.permute)) if on]
    if unsupported:
        raise UserError(f"{unsupported[0]} is not supported with --stream or --nproc; prune without them")
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    parse(args.pattern)
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; available: {', '.join(sorted(METHODS))}")
    if args.calib_samples < 1 or args.calib_seqlen < 2:
        raise UserError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    if METHODS[args.method].block_refit:
        raise UserError(f"--method {args.method} is not supported with --stream or --nproc (it keeps the dense "
                        "model's activations beside the pruned ones); prune without them")


def run_streamed(args: argparse.Namespace) -> int:
    """The ``nmkit prune`` command for ``--stream`` / ``--nproc``: launch the ranks, or be one of them."""
    _check_flags(args)
    device = preflight.torch_device(args.device)  # refused here, before any worker starts
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args)
    ranks = from_environment(device)
    if ranks.size != args.nproc:
        raise UserError(f"started with {ranks.size} ranks but --nproc {args.nproc}; give the same number")
    method = METHODS[args.method]
    out = Path(args.out).expanduser()
    ckpt = resume.checkpoint_dir(out)
    if ranks.leader:  # the filesystem checks and tidying, once
        saved = args.resume and resume.output_saved(out)
        resume.tidy(out, _log)
        if saved:
            _log(f"--resume: {out} was saved completely before the run was interrupted; nothing to resume")
            return 0
        check_output_dir(out, args.overwrite)
        preflight.check_writable(out)
        resume.check_checkpoint(out, args.resume, _log)
    source = models.resolve(args.model)
    if source.kind != "causal-lm":
        raise UserError(f"--stream and --nproc prune causal language models; {args.model} is an encoder")
    path = Path(models.materialised_path(source))
    SafetensorsDir(path)  # a missing or truncated shard is refused before the calibration text is read
    t0 = time.perf_counter()
    calibration = calib_info = None
    if method.calibrated:
        tokenizer = models.load_tokenizer(source)
        calib = calibration_set.from_args(tokenizer, args, preflight.hidden_size(path))
        calibration, calib_info = calib.samples, calib.info
    load_s = time.perf_counter() - t0
    options = {name: getattr(args, name) for name in method.options}
    cpu0 = time.process_time()
    result, outside, dims = prune_streaming(
        path, args.pattern, args.method, calibration, ckpt, args.include, args.exclude, args.tail, options,
        resume=args.resume, ranks=ranks, device=device,
        run_config={"model": source.path, "calibration": calib_info, **resume.run_arguments(vars(args))})
    prune_cpu_s = time.process_time() - cpu0
    # The skeleton model (embeddings and LM head) sits in reference cycles: collect it now, or it is
    # still held while the output step reads those same tensors again (one more copy at the peak).
    gc.collect()
    if ranks.leader:
        _write_output(args, out, path, ckpt, outside, dims, source, result, calib_info, ranks,
                      {"load_s": round(load_s, 3), "prune_s": round(result.seconds, 3),
                       "prune_cpu_s": round(prune_cpu_s, 3), "comm_s": round(ranks.seconds, 3), "eval_s": 0.0})
    if ranks.size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _write_output(args, out: Path, path: Path, ckpt: Path, outside: list[str], dims: dict[str, int], source,
                  result, calib_info, ranks: Ranks, timings: dict) -> None:
    base = models.base_info(source)
    layers = {x.name: {"pattern": x.pattern, "dim": dims[x.name], "shape": x.shape} for x in result.layers}
    report = {"model": base["name"] if Path(source.name).exists() else source.name, "base": base,
              "pattern": str(parse(args.pattern)), "method": args.method, "ppl_dense": None, "ppl_sparse": None,
              "eval": None, "calibration": calib_info, "streamed": True, "ranks": ranks.size,
              "sparsity": result.sparsity, "all_valid": result.all_valid, "layers": [vars(x) for x in result.layers],
              "timings": timings, "date": now(), "machine": machine(), "run_id": uuid.uuid4().hex}
    try:
        with atomic_directory(out, args.overwrite) as tmp:
            write_streamed_model(tmp, path, ckpt, outside)
            faults.point("during-save")
            sidecar.write(tmp, layers, model=source.name, base=base, method=args.method, pattern=report["pattern"],
                          tail=args.tail, eval=None, calibration=calib_info)
            report["versions"] = sidecar.versions()
            (tmp / "report.json").write_text(dumps(report, indent=2) + "\n")
            (tmp / "report.md").write_text(prune_markdown(report))
            resume.mark_saved(out, report["run_id"])
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        raise UserError(f"cannot write {out}: {failure}; the pruned blocks are kept in {ckpt}: free space and "
                        "rerun the same command with --resume") from None
    faults.point("after-save")
    resume.remove(out)
    _log(f"wrote {out} (not evaluated: run `nmkit eval {out}`)")
    print(dumps(report, indent=2) if args.json else prune_markdown(report))


def launch(args: argparse.Namespace) -> int:
    """Run ``args`` on ``args.nproc`` torchrun workers; one line on failure, the workers' output otherwise."""
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="nmkit-prune-", delete=False) as fh:
        json.dump(settings, fh)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "nmkit.commands.prune_stream", fh.name]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    seen: set[str] = set()
    unexpected: list[str] = []  # held back: when a worker died, the others' broken-connection errors are noise
    error = False
    failed: list[str] = []
    try:
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        for line in proc.stderr:
            if line.startswith(("nmkit:", "nmkit prune:")):  # nmkit's own lines, not torchrun's summary
                if line in seen:
                    continue
                seen.add(line)
                if line.startswith("nmkit prune: unexpected error"):
                    unexpected.append(line)
                else:
                    sys.stderr.write(line)
                error |= line.startswith("nmkit prune: error:")
            elif args.debug:
                sys.stderr.write(line)
            m = re.search(r"exitcode\s*:\s*(-?\d+)", line)
            if m:
                failed.append(m.group(1))
        code = proc.wait()
    finally:
        os.unlink(fh.name)
    if code == 0 or error:
        return 0 if code == 0 else 2
    if unexpected and not any(f.startswith("-") for f in failed):  # no worker was killed: show what went wrong
        sys.stderr.writelines(unexpected)
        return 1
    how = f"exit code {failed[0]}" if failed and not failed[0].startswith("-") else (
        f"killed by signal {failed[0][1:]}" if failed else f"torchrun exit code {code}")
    print(f"nmkit prune: error: a worker of the {args.nproc}-rank run died ({how}); the blocks committed so far "
          f"are kept in {resume.checkpoint_dir(args.out)}: rerun the same command with --resume", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """A torchrun worker: ``python -m nmkit.commands.prune_stream SETTINGS.json``."""
    argv = sys.argv[1:] if argv is None else argv
    args = argparse.Namespace(**json.loads(Path(argv[0]).read_text()))
    try:
        return run_streamed(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"nmkit prune: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, the traceback on request
        if args.debug:
            raise
        print(f"nmkit prune: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
