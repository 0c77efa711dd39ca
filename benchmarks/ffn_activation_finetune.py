"""Issue 19 at SmolLM2 scale: what a short fine-tune with V:N:M FFN activations costs against a dense one.

Starting from the same model (SmolLM2-135M by default, or an ``nmkit prune`` directory), each run
fine-tunes with ``nmkit finetune``'s recipe, :func:`nmkit.training.recovery.recovery_finetune` with
no pruned layers (AdamW betas 0.9/0.95, no weight decay, ``--lr`` peak with ``--warmup`` linear steps
then cosine to 0, gradient clip 1.0, embeddings and the tied LM head frozen), on the same seeded
WikiText-2 train windows in the same order (``nmkit.data.calibration_windows``, as the command):

- ``dense``: a plain fine-tune, the reference;
- ``V:N:M`` (one run per ``--patterns`` entry): the same fine-tune with the inputs of every Linear
  matching ``--targets`` (the MLP's gate/up/down projections) pruned to V:N:M on every call, through
  :class:`nmkit.training.sparse_ffn.VNMActivationTraining`. V should be the tokens of one step
  (batch x seqlen), so one set of columns is shared per step, the fast setting.

Every model, trained or not, is evaluated with ``nmkit.evaluate.perplexity`` (the helper ``nmkit
finetune`` uses) on the first ``--eval-windows`` non-overlapping windows of ``--eval-seqlen`` tokens of
WikiText-2 test, once dense and once per pattern with the activation sparsity on. Evaluation runs one
window per forward, so the eval pattern is the training one with V set to ``--eval-seqlen`` (one block
per window; ``--eval-v`` overrides it). The untrained start is evaluated the same way: the zero-shot
cost. The headline is ``ppl(V:N:M fine-tune, eval V:N:M) / ppl(dense fine-tune, eval dense)``.

Caveat of V = a whole window: a block's shared columns are chosen from all its tokens' norms, later
tokens included, so a token's pruning depends (weakly: 4 of M columns per M features per block) on
the future. The same holds in training, where one block spans the step's sequences.

    NMKIT_DATA=/work/shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ffn_activation_finetune.py \\
        --steps 150 --batch 2 --seqlen 256 --patterns 512:2:8 --eval-windows 16 --eval-seqlen 512 \\
        --out ffn_activation_finetune.json
    # the same V:N:M fine-tune on the down projections' inputs only, its ratio to the dense run above
    ... --runs start,sparse --targets '*mlp.down_proj' --baseline ffn_activation_finetune.json --out ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nmkit import data, models
from nmkit.evaluate import perplexity
from nmkit.patterns import VNM
from nmkit.training.recovery import RecoveryConfig, recovery_finetune
from nmkit.training.sparse_ffn import VNMActivationTraining, as_vnm


def _log(msg: str) -> None:
    print(f"ffn_activation_finetune: {msg}", file=sys.stderr, flush=True)


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _load(args) -> torch.nn.Module:
    model = models.load(args.model)
    model.eval()
    return model


def _eval_pattern(pattern: VNM, args) -> VNM:
    return VNM(args.eval_v or args.eval_seqlen, pattern.keep, pattern.group, pattern.columns)


def _ppl(model, texts, args, pattern: VNM | None) -> dict:
    """Perplexity under the pinned protocol, dense (``pattern`` None) or with V:N:M FFN activations."""
    t = time.perf_counter()
    model.eval()
    swap = VNMActivationTraining(model, pattern, targets=args.targets) if pattern is not None else None
    try:
        res = perplexity(model, None, texts["test"], args.eval_seqlen, args.eval_windows, ids=texts["test_ids"],
                         progress=False)
    finally:
        if swap is not None:
            swap.remove()
    return {"eval": "dense" if pattern is None else str(pattern), "ppl": res.ppl, "nll": res.nll,
            "eval_s": round(time.perf_counter() - t, 1), "protocol": res.protocol}


def _evals(model, texts, args, patterns: list[VNM]) -> list[dict]:
    rows = [_ppl(model, texts, args, None)]
    rows += [_ppl(model, texts, args, _eval_pattern(p, args)) for p in patterns]
    return rows


def _window_mean(values: list[float], first: bool, n: int) -> float:
    part = values[:n] if first else values[-n:]
    return statistics.fmean(part)


def run_train(pattern: VNM | None, args, texts, batches: torch.Tensor, eval_patterns: list[VNM]) -> dict:
    name = "dense" if pattern is None else str(pattern)
    model = _load(args)
    cfg = RecoveryConfig(steps=args.steps, lr=args.lr, warmup=args.warmup)
    swap = VNMActivationTraining(model, pattern, targets=args.targets) if pattern is not None else None
    c0 = time.process_time()
    try:
        res = recovery_finetune(model, [], None, batches, cfg,
                                log=lambda m: _log(f"[{name}] {m}"))
    finally:
        swaps = len(swap.remove()) if swap is not None else 0
    cpu_s = time.process_time() - c0
    losses = res.losses
    n = min(args.loss_window, len(losses))
    return {
        "run": name,
        "train_pattern": None if pattern is None else str(pattern),
        "swapped_linears": swaps,
        "steps": res.steps_done,
        "train_s": round(res.seconds, 1),
        # CPU time: on a shared machine the wall clock also counts time this process was paused or waiting.
        "train_cpu_s": round(cpu_s, 1),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first_mean": _window_mean(losses, True, n),
        "loss_last_mean": _window_mean(losses, False, n),
        "loss_window": n,
        "evals": _evals(model, texts, args, eval_patterns),
        "losses": losses,
    }


def run_start(args, texts, eval_patterns: list[VNM]) -> dict:
    model = _load(args)
    return {"run": "start (no training)", "train_pattern": None, "steps": 0,
            "evals": _evals(model, texts, args, eval_patterns)}


def _ppl_of(run: dict, eval_name: str) -> float | None:
    return next((e["ppl"] for e in run["evals"] if e["eval"] == eval_name), None)


def table(result: dict) -> str:
    """One row per (run, eval); the ratio is to the dense fine-tune evaluated dense."""
    runs = result["runs"]
    base = result.get("dense_ft_ppl")
    lines = [
        f"Eval: WikiText-2 test, first {result['meta']['eval_windows']} windows x {result['meta']['eval_seqlen']} "
        f"tokens; V:N:M on the inputs of {','.join(result['meta']['targets'])}; "
        "ratio = ppl / ppl(dense fine-tune, eval dense)"
        + (f" = {base:.3f}" + (f", from {result['meta']['baseline']}" if result["meta"].get("baseline") else "")
           if base else " (no dense run: pass --baseline)"),
        "",
        f"| run | trained with | steps | train loss first/last {result['meta']['loss_window']}-step mean | "
        "evaluated with | test ppl | ratio to dense FT | train minutes (CPU / wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        trained = r["train_pattern"] or ("-" if r["steps"] == 0 else "dense")
        if r["steps"]:
            loss = f"{r['loss_first_mean']:.4f} / {r['loss_last_mean']:.4f}"
            minutes = f"{r['train_cpu_s'] / 60:.1f} / {r['train_s'] / 60:.1f}"
        else:
            loss = minutes = "-"
        for e in r["evals"]:
            ratio = f"{e['ppl'] / base:.3f}" if base else "-"
            lines.append(f"| {r['run']} | {trained} | {r['steps']} | {loss} | {e['eval']} | {e['ppl']:.3f} | "
                         f"{ratio} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, HF directory (e.g. from `nmkit prune`) or id")
    p.add_argument("--patterns", default="512:2:8",
                   help="comma-separated V:N:M activation patterns, one fine-tune each (V = batch x seqlen "
                        "is the fast setting; default 512:2:8)")
    p.add_argument("--runs", default="start,dense,sparse",
                   help="subset of start (no training), dense (dense fine-tune), sparse (one per pattern)")
    p.add_argument("--targets", default="*mlp.*",
                   help="comma-separated globs of the Linears whose inputs go V:N:M (default *mlp.*: gate/up/down)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5, help="peak lr, cosine (default 5e-5, as nmkit finetune)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10, as nmkit finetune)")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-v", type=int, default=None,
                   help="V of the eval patterns (default --eval-seqlen: one block per eval window)")
    p.add_argument("--loss-window", type=int, default=20, help="steps in the first/last train-loss means (20)")
    p.add_argument("--seed", type=int, default=0, help="training-window order (default 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="folder with wikitext-2-raw/ (default $NMKIT_DATA)")
    p.add_argument("--out", default="ffn_activation_finetune.json", help="JSON path, rewritten after every run")
    p.add_argument("--baseline", default=None, metavar="JSON",
                   help="an earlier run's JSON whose dense fine-tune is the ratio's reference (same protocol), "
                        "for a run without --runs dense, e.g. other --targets")
    args = p.parse_args(argv)
    args.targets = [g.strip() for g in args.targets.split(",") if g.strip()]
    patterns = [as_vnm(s.strip()) for s in args.patterns.split(",") if s.strip()]
    runs = [s.strip() for s in args.runs.split(",") if s.strip()]
    if set(runs) - {"start", "dense", "sparse"}:
        p.error("--runs takes start, dense, sparse")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    tokens = args.batch * args.seqlen
    for pat in patterns:
        if pat.v != tokens:
            _log(f"note: {pat} has V={pat.v}, a step has {tokens} tokens (V = tokens per step is the fast setting)")
    torch.set_num_threads(args.threads)

    tokenizer = models.load_tokenizer(args.model)
    train = data.load_text("train", args.data_dir)
    test = data.load_text("test", args.data_dir)
    train_ids = data.tokenize(tokenizer, train)
    # The finetune command's windows: seeded random windows of train, one per sequence, in step order.
    batches = data.calibration_windows(train_ids, args.steps * args.batch, args.seqlen, args.seed)
    batches = batches.view(args.steps, args.batch, args.seqlen)
    texts = {"test": test, "test_ids": data.tokenize(tokenizer, test)}
    meta = dict(vars(args))
    meta.update(torch=torch.__version__, train_data=train.info, tokens_per_step=tokens,
                eval_patterns=[str(_eval_pattern(pt, args)) for pt in patterns], started=_stamp())
    result: dict = {"meta": meta, "runs": [], "dense_ft_ppl": None}
    if args.baseline:
        earlier = json.loads(Path(args.baseline).read_text())
        keys = ("model", "steps", "batch", "seqlen", "lr", "warmup", "seed", "eval_seqlen", "eval_windows")
        differ = [k for k in keys if earlier["meta"].get(k) != meta[k]]
        if differ:
            p.error(f"--baseline {args.baseline} differs in {', '.join(differ)}; the ratio would not be paired")
        result["dense_ft_ppl"] = earlier.get("dense_ft_ppl")
        if result["dense_ft_ppl"] is None:
            p.error(f"--baseline {args.baseline} has no dense fine-tune")
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1) + "\n")

    def done(r: dict) -> None:
        result["runs"].append(r)
        if r["run"] == "dense":
            result["dense_ft_ppl"] = _ppl_of(r, "dense")
        save()
        _log(f"{r['run']}: " + ", ".join(f"eval {e['eval']} ppl {e['ppl']:.3f}" for e in r["evals"])
             + (f"; train loss {r['loss_last_mean']:.4f}, {r['train_s'] / 60:.1f} min" if r["steps"] else ""))

    if "start" in runs:
        done(run_start(args, texts, patterns))
    if "dense" in runs:
        done(run_train(None, args, texts, batches, patterns))
    if "sparse" in runs:
        for pat in patterns:
            done(run_train(pat, args, texts, batches, [pat]))
    result["meta"]["finished"] = _stamp()
    save()
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
