"""``nmkit finetune DIR --steps S [--distill]``: recovery fine-tune of a pruned model with its mask fixed.

Reads a directory written by ``nmkit prune`` (HF model + tokenizer + ``nmkit.json``), trains the pruned
layers on WikiText-2 train with their zero pattern frozen (pruned weights stay exactly zero),
optionally distilling the dense model's logits, evaluates perplexity under the same protocol as the
prune report, and writes a new directory atomically (temporary sibling, then rename).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nmkit import data, model_card, models, preflight, sidecar
from nmkit.dynamic import runtime_sparsity
from nmkit.errors import UserError
from nmkit.evaluate import perplexity
from nmkit.jsonout import dumps
from nmkit.outputs import atomic_directory, check_output_dir
from nmkit.patterns import NM
from nmkit.selection import parse_layers
from nmkit.training.recovery import RecoveryConfig, recovery_finetune


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="pruned model directory written by `nmkit prune`; with --attention also any "
                               "model (alias, HF directory or id), fine-tuned dense for N:M attention")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: DIR-ft)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--distill", action="store_true", help="distil the dense teacher's logits (KL) as well")
    p.add_argument("--teacher", default=None, help="dense teacher (default: the model named in DIR/nmkit.json)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="loss = (1-w) CE + w KL with --distill (default 0.5)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate, cosine schedule (default 5e-5)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per training sequence (default 256)")
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="train masked LoRA adapters of rank R instead of the weights (merged, still N:M)",
    )
    p.add_argument("--attention", default=None, metavar="N:M",
                   help="train (and evaluate) with run-time N:M attention (DFSS): each query keeps the N largest "
                        "of every M keys; recorded in nmkit.json so `nmkit eval` applies it (default: as DIR's "
                        "nmkit.json says, else none); 'dense' fine-tunes a dense model with dense attention, "
                        "the control for such a run")
    p.add_argument("--attention-layers", default=None, metavar="LIST",
                   help="only these layers get N:M attention, e.g. 2-29 (default: all)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    p.add_argument("--seed", type=int, default=0, help="seed of the training-window order (default 0)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="default: the prune report's protocol, else 2048")
    p.add_argument("--eval-windows", type=int, default=None, help="default: the prune report's protocol, else 16")
    p.add_argument("--eval-before", action="store_true", help="re-measure perplexity before training too")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data-dir", default=None, help="folder with wikitext-2-raw/ (default $NMKIT_DATA)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _log(msg: str) -> None:
    print(f"nmkit: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    src = Path(args.dir).expanduser()
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    preflight.finite_number("--lr", args.lr, 0)
    if not 0 <= preflight.finite_number("--kd-weight", args.kd_weight) <= 1:
        raise UserError(f"--kd-weight must be in [0, 1], got {args.kd_weight}")
    if args.max_minutes is not None:
        preflight.finite_number("--max-minutes", args.max_minutes, 0)
    attention = runtime_attention(args.attention, args.attention_layers)
    control = args.attention == "dense"  # the same recipe with dense attention, to compare against
    pruned_dir = sidecar.exists(src)
    if pruned_dir or (attention is None and not control):
        meta = sidecar.read(src)
        attention = attention or sidecar.runtime_attention(meta)
    else:  # a dense model, fine-tuned for N:M attention only
        if args.lora:
            raise UserError("--lora trains adapters on pruned layers; a dense model has none (drop --lora)")
        source = models.resolve(args.dir)
        if source.kind != "causal-lm":
            raise UserError(f"{args.dir!r} is not a causal language model; finetune trains on next-token loss")
        meta = {"model": source.name, "pattern": "dense", "layers": {}}
        if not args.out:
            raise UserError(f"{args.dir!r} is not a directory written by `nmkit prune`; name the output with --out")
    dense_source = meta["pattern"] == "dense"
    try:
        pattern = None if dense_source else NM.parse(meta["pattern"])
    except Exception as exc:
        raise UserError(f"finetune needs an N:M-pruned directory; {src} has pattern {meta.get('pattern')!r}") from exc
    if dense_source and attention is None and not control:
        raise UserError(f"{src} is not pruned; pass --attention N:M to fine-tune it for N:M attention "
                        "(--attention dense runs the same recipe with dense attention, as a control)")
    layers = [name for name, info in meta["layers"].items() if info.get("dim", 1) == 1]
    out = Path(args.out).expanduser() if args.out else src.with_name(src.name + "-ft")
    check_output_dir(out, args.overwrite)
    preflight.check_writable(out)
    if pruned_dir:
        preflight.check_model_dir(src, tokenizer=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    prune_report = json.loads((src / "report.json").read_text()) if (src / "report.json").is_file() else {}
    protocol = prune_report.get("eval") or meta.get("eval") or {}
    eval_seqlen = args.eval_seqlen or protocol.get("seqlen") or 2048
    eval_windows = args.eval_windows or protocol.get("windows") or 16

    _log(f"loading {args.dir}")
    if not pruned_dir:
        model, tokenizer = models.load(args.dir), models.load_tokenizer(args.dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src)
    # The source's recorded perplexity was measured without this attention unless its sidecar had it.
    new_attention = attention is not None and attention != sidecar.runtime_attention(meta)
    zeros_before = {n: (m.weight == 0).clone() for n, m in model.named_modules() if n in set(layers)}
    teacher = None
    if args.distill:
        name = args.teacher or meta.get("model")
        if not name:
            raise UserError("--distill needs a dense teacher: pass --teacher MODEL")
        _log(f"loading teacher {name}")
        teacher = models.load(name).eval()

    train = data.load_text("train", args.data_dir)
    ids = data.tokenize(tokenizer, train)
    batches = data.calibration_windows(ids, args.steps * args.batch, args.seqlen, args.seed)
    batches = batches.view(args.steps, args.batch, args.seqlen)

    report: dict = {
        "source": str(src),
        "pattern": "dense" if pattern is None else str(pattern),
        "attention": attention,
        "steps": args.steps,
        "distill": args.distill,
        "teacher": (args.teacher or meta.get("model")) if args.distill else None,
        "lr": args.lr,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "lora_rank": args.lora,
        "train_data": train.info,
        "ppl_dense": prune_report.get("ppl_dense"),
        "ppl_before": None if new_attention else prune_report.get("ppl_sparse"),
        "ppl_before_source": "prune report",
    }
    text = None
    if not args.no_eval:
        text = data.load_text("test", args.data_dir)
        test_ids = data.tokenize(tokenizer, text)
        if dense_source and report["ppl_dense"] is None:
            _log("evaluating the model as it is, without run-time sparsity")
            report["ppl_dense"] = perplexity(model, tokenizer, text, eval_seqlen, eval_windows, ids=test_ids).ppl
        if dense_source and attention is None:  # the control: nothing differs from the dense model yet
            report["ppl_before"], report["ppl_before_source"] = report["ppl_dense"], "= dense"
        if args.eval_before or report["ppl_before"] is None:
            _log("evaluating before fine-tuning" + (f" (attention {attention['pattern']})" if attention else ""))
            with _attention(model, attention):
                report["ppl_before"] = perplexity(model, tokenizer, text, eval_seqlen, eval_windows,
                                                  ids=test_ids).ppl
            report["ppl_before_source"] = "measured"

    cfg = RecoveryConfig(
        steps=args.steps,
        lr=args.lr,
        kd_weight=args.kd_weight,
        lora_rank=args.lora,
        max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
    )
    with _attention(model, attention):
        result = recovery_finetune(model, layers, pattern, batches, cfg, teacher=teacher, log=_log)
    report.update(
        steps_done=result.steps_done,
        train_seconds=round(result.seconds, 1),
        loss_first=result.losses[:5],
        loss_last=result.losses[-5:],
        all_valid=result.finalize["valid"],
    )
    changed = sum(
        int((~(m.weight == 0) & zeros_before[n]).sum()) for n, m in model.named_modules() if n in zeros_before
    )
    report["mask_unchanged"] = changed == 0
    if not args.no_eval:
        t = time.perf_counter()
        with _attention(model, attention):
            res = perplexity(model, tokenizer, text, eval_seqlen, eval_windows, ids=test_ids)
        report["ppl_after"], report["eval"] = res.ppl, res.protocol
        report["eval_seconds"] = round(time.perf_counter() - t, 1)
        dense, before = report["ppl_dense"], report["ppl_before"]
        # A dense source fine-tuned on WikiText-2 beats its own untuned perplexity with no sparsity
        # at all, so a "gap closed" would be meaningless; compare with an --attention dense control.
        if dense is not None and before is not None and before > dense and not dense_source:
            report["gap_closed"] = (before - res.ppl) / (before - dense)

    with atomic_directory(out, args.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        kept = {k: v for k, v in meta.items() if k not in ("layers", "versions", "format", "version", "runtime")}
        if report.get("eval"):  # the protocol `nmkit eval` of the output reproduces by default
            kept["eval"] = report["eval"]
        sidecar.write(
            tmp,
            meta["layers"],
            **kept,
            **({"runtime": {"attention": attention}} if attention else {}),
            finetune={k: v for k, v in report.items() if k not in ("loss_first", "loss_last")},
        )
        (tmp / "finetune.json").write_text(dumps(report, indent=2) + "\n")
        model_card.write(tmp)
    _log(f"wrote {out}")
    if args.json:
        print(dumps(report, indent=2))
    else:
        print(_markdown(report))
    return 0 if report["all_valid"] and report["mask_unchanged"] else 1


def runtime_attention(spec: str | None, layer_spec: str | None) -> dict | None:
    """``--attention`` / ``--attention-layers`` as the sidecar records them: {"pattern", "layers"}."""

    if spec is None or spec == "dense":
        if layer_spec is not None:
            raise UserError("--attention-layers needs --attention N:M")
        return None
    return {"pattern": str(NM.parse(spec)), "layers": parse_layers(layer_spec)}


def _attention(model, attention: dict | None):
    return runtime_sparsity(model, *((attention["pattern"], attention["layers"]) if attention else ()))


def _markdown(r: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"Recovery fine-tune of {r['source']} ({r['pattern']}, mask fixed"
        + (f"; attention {r['attention']['pattern']}" if r.get("attention") else "")
        + f"): {r['steps_done']}/{r['steps']} steps "
        f"in {r['train_seconds']} s, distill={r['distill']}, lora_rank={r['lora_rank']}",
        "",
        "| dense ppl | pruned ppl | fine-tuned ppl | gap closed | N:M valid | mask unchanged |",
        "|---|---|---|---|---|---|",
        f"| {f(r.get('ppl_dense'))} | {f(r.get('ppl_before'))} | {f(r.get('ppl_after'))} | "
        f"{'-' if r.get('gap_closed') is None else format(r['gap_closed'], '.0%')} | {r['all_valid']} | "
        f"{r['mask_unchanged']} |",
    ]
    return "\n".join(lines)
