"""The ``nmkit`` command line: prune | eval | inspect | bench | export | finetune | quantize | generate | serve.

Exit codes: 0 success, 1 a check failed (e.g. ``inspect`` found an invalid layer), 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from nmkit import calibration, data, faults, model_card, models, preflight, recipe, resume, sidecar
from nmkit.api import plan as sparsify_plan
from nmkit.api import sparsify_
from nmkit.commands import prune_stream
from nmkit.commands.quantize import add_quant_arguments, parse_spec, quant_options, quantize_pruned, write_output
from nmkit.dynamic import runtime_sparsity
from nmkit.errors import UserError
from nmkit.evaluate import DensePerplexityCache, embedding_fidelity, perplexity, protocol_for
from nmkit.inspect import inspect_directory
from nmkit.jsonout import dumps
from nmkit.oneshot import find_targets, prune
from nmkit.oneshot.methods import METHODS, method_help
from nmkit.outputs import atomic_directory, check_output_dir, write_failure
from nmkit.patterns import NM, NM_HELP, parse
from nmkit.plan import planfile
from nmkit.report import machine, now, plot_layer_errors, prune_markdown
from nmkit.selection import parse_layers

# Commands provided by other modules: each has add_arguments(parser) and run(args) -> int.
# They are listed only when their module is present.
BENCH_SUITES = {
    "masks": ("nmkit.bench.masks", "mask solver quality and speed (fixed, seeded suite)"),
    "kernels": ("nmkit.bench.kernels", "sparse kernels vs torch dense F.linear, interleaved"),
    "generate": ("nmkit.bench.generate", "greedy decode and prefill, dense vs compressed"),
    "train": ("nmkit.bench.train", "sparse training methods on a tiny GPT"),
    "dynamic": ("nmkit.bench.dynamic", "run-time N:M attention (DFSS) and FFN inputs: quality per config"),
}
EXTRA_COMMANDS = {
    "export": ("nmkit.commands.export", "export a pruned model (dense+sidecar, nmkit compressed, ...)"),
    "finetune": ("nmkit.commands.finetune", "recovery fine-tune of a pruned model with its mask fixed"),
    "quantize": ("nmkit.commands.quantize", "INT8/INT4 kept values for a pruned model (calibrated, mask fixed)"),
    "generate": ("nmkit.commands.generate", "generate text with the lean decode runtime (streamed, chat template)"),
    "serve": ("nmkit.commands.serve", "an OpenAI-compatible HTTP server on the lean decode runtime"),
    "plan": ("nmkit.commands.plan", "choose a pattern per layer for a device and a speed target (plan.json)"),
}


def _available(table: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    def present(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # parent package absent
            return False

    return {k: v for k, v in table.items() if present(v[0])}


def _attach(p: argparse.ArgumentParser, module: str, selected: bool) -> None:
    """Import a command's module only when it is the one being run, so a slow or broken optional
    module never costs the other commands anything."""
    if selected:
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    else:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _add_eval_args(p: argparse.ArgumentParser, default_seqlen: int | None = 2048) -> None:
    recorded = default_seqlen is None  # `eval`: the directory's recorded protocol first
    p.add_argument("--eval-seqlen", type=int, default=default_seqlen, metavar="S",
                   help="tokens per evaluation window (default: " + ("as DIR/nmkit.json records, else 2048)"
                                                                     if recorded else f"{default_seqlen})"))
    p.add_argument("--eval-windows", type=int, default=None, metavar="K",
                   help="score only the first K windows (default: " + ("as DIR/nmkit.json records, else all)"
                                                                       if recorded else "all)"))
    p.add_argument("--data-dir", default=None, metavar="D",
                   help="folder holding wikitext-2-raw/wiki.{train,valid,test}.raw (default: $NMKIT_DATA; "
                        "without either, HF datasets if reachable, else Python's bundled pydoc text)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmkit",
        description="N:M structured sparsity for PyTorch models. " + NM_HELP + ".",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model one-shot to an N:M pattern, evaluate and save it",
                       description="Prune every Linear layer inside the transformer blocks to PATTERN. "
                                   + NM_HELP + ".")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="built-in alias (smollm2-135m, minilm), local HF directory or HF id (default smollm2-135m)")
    p.add_argument("--pattern", default="2:4", help="N:M pattern, e.g. 2:4 (keep 2 of 4), 4:8, 1:4, 2:8; "
                                                    "or 50%% (unstructured) (default 2:4)")
    p.add_argument("--method", default="magnitude",
                   help=method_help() + " (default magnitude)")
    calibration.add_arguments(p)
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT Hessian dampening, fraction of mean "
                   "diagonal (default 0.01)")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size (default 128)")
    p.add_argument("--block-epochs", type=int, default=4, metavar="E",
                   help="*-block methods: epochs of fitting each block to the dense block's output (default 4)")
    p.add_argument("--block-lr", type=float, default=1e-3, metavar="LR",
                   help="*-block methods: Adam learning rate of that fit (default 1e-3)")
    p.add_argument("--model-epochs", type=int, default=0, metavar="E",
                   help="*-block methods: then E epochs of fitting the whole pruned model to the dense model's "
                        "outputs on the calibration windows (logits KL; masks fixed) (default 0: off)")
    p.add_argument("--model-lr", type=float, default=1e-4, metavar="LR",
                   help="peak learning rate of that fit, warm-up then cosine (default 1e-4)")
    p.add_argument("--permute", action="store_true",
                   help="before pruning, permute the input channels of down_proj/o_proj (absorbed by gate/up and "
                        "v_proj, so the model computes the same function) so that N:M keeps more of the method's "
                        "score; plain N:M patterns only")
    p.add_argument("--permute-budget", type=float, default=5.0, metavar="S",
                   help="seconds of permutation search per layer (default 5)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibrated run from its checkpoint (DIR.nmkit-ckpt)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--stream", action="store_true", help="read, prune and write one block at a time from a "
                   "safetensors directory, never holding the whole model (no evaluation; see docs/distributed.md)")
    p.add_argument("--nproc", type=int, default=1, metavar="K", help="prune with K torch.distributed ranks "
                   "(torchrun; gloo on CPU, NCCL on CUDA), streamed (default 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="prune only layers whose name matches GLOB (repeatable; default: all Linear layers "
                        "inside the transformer blocks)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip layers matching GLOB (repeatable)")
    p.add_argument("--tail", choices=("error", "pad", "dense"), default="error",
                   help="when an input dim is not a multiple of M: error (default), pad, or leave it dense")
    add_quant_arguments(p, required=False)
    p.add_argument("--recipe", metavar="YAML", default=None,
                   help="take pattern (and per-layer patterns by glob), method, calibration, include/exclude, "
                        "permute and tail from a YAML recipe (see nmkit.recipe); it replaces those flags")
    p.add_argument("--plan", metavar="plan.json", default=None,
                   help="prune each layer to the pattern `nmkit plan` chose for it (layers it keeps dense stay "
                        "dense), with the plan's method; replaces --pattern, --include and --exclude")
    _add_eval_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of Markdown")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity of a model or pruned directory (pinned protocol)",
                       description="Perplexity of a causal LM under the pinned protocol, optionally with run-time "
                                   "N:M sparsity in attention scores (DFSS) or FFN inputs. An encoder (e.g. minilm) "
                                   "is scored by embedding cosine against itself without that sparsity.")
    p.add_argument("model", help="built-in alias, local HF directory (e.g. a `nmkit prune` output) or HF id")
    _add_eval_args(p, default_seqlen=None)
    p.add_argument("--attention", default=None, metavar="N:M",
                   help="prune attention scores at run time: each query keeps the N largest of every M keys "
                        "(DFSS), e.g. 2:4 (default: what DIR/nmkit.json records from `nmkit finetune "
                        "--attention`; 'none' leaves it out)")
    p.add_argument("--attention-layers", default=None, metavar="LIST",
                   help="only these layers get N:M attention, e.g. 2-29 or 0,1,5 (default: all)")
    p.add_argument("--activations", default=None, metavar="N:M",
                   help="prune each token's FFN hidden state (the input of the down projection) to N:M by "
                        "magnitude at run time, e.g. 2:4")
    p.add_argument("--baseline", action="store_true",
                   help="also evaluate without the run-time sparsity and report the ratio")
    p.add_argument("--second-text", action="store_true",
                   help="evaluate on the second text prune reports give beside WikiText (Python's language "
                        "reference, pydoc_data.topics held-out split, 16 x 512 tokens) instead")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="per-layer pattern, sparsity and validity of a pruned directory")
    p.add_argument("dir", help="directory written by `nmkit prune`")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    argv = [] if argv is None else argv
    suites = _available(BENCH_SUITES)
    if suites:
        p = sub.add_parser("bench", help="benchmarks: " + ", ".join(suites))
        bench_sub = p.add_subparsers(dest="suite", required=True, metavar="SUITE")
        for name, (module, help_) in suites.items():
            sp = bench_sub.add_parser(name, help=help_, description=help_)
            _attach(sp, module, argv[:2] == ["bench", name])
    for name, (module, help_) in _available(EXTRA_COMMANDS).items():
        p = sub.add_parser(name, help=help_, description=help_)
        _attach(p, module, argv[:1] == [name])
    return parser


def _log(msg: str) -> None:
    print(f"nmkit: {msg}", file=sys.stderr, flush=True)


class _SecondText:
    """Perplexity on the second text (:data:`nmkit.data.SECOND_TEXT`), dense from the cache when it can."""

    def __init__(self, tokenizer, cache: DensePerplexityCache, model_path: str):
        self.text = data.second_text()
        self.ids = data.tokenize(tokenizer, self.text)
        self.tokenizer = tokenizer
        self.protocol = protocol_for(self.text, self.ids, data.SECOND_SEQLEN, data.SECOND_WINDOWS)
        self.cache, self.key = cache, cache.key(model_path, self.protocol)

    def perplexity(self, model) -> float:
        return perplexity(model, self.tokenizer, self.text, data.SECOND_SEQLEN, data.SECOND_WINDOWS, ids=self.ids).ppl

    def dense(self, model) -> float:
        ppl = self.cache.get(self.key)
        if ppl is None:
            _log(f"evaluating dense model on {self.text.dataset} (second text)")
            ppl = self.perplexity(model)
            self.cache.put(self.key, ppl)
        return ppl


def cmd_prune(args: argparse.Namespace) -> int:
    if args.stream or args.nproc != 1:
        return prune_stream.run_streamed(args)



    # Validate everything cheap before loading anything heavy.
    layer_plan = _read_plan(args) if args.plan else None
    plan = recipe.load(args.recipe) if args.recipe else None
    if plan is not None:  # the recipe replaces the flags it covers
        args.pattern, args.method, args.include, args.exclude = plan.pattern, plan.method, plan.include, plan.exclude
        args.calib_samples, args.calib_seqlen = plan.calibration["samples"], plan.calibration["seqlen"]
        args.calib_seed, args.tail = plan.calibration["seed"], plan.tail
        args.calib_data = plan.calibration["data"]
        args.permute, args.permute_budget = plan.permute, plan.permute_budget_s
    pattern = parse(args.pattern)
    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}; available: {', '.join(sorted(METHODS))}")
    if args.calib_samples < 1 or args.calib_seqlen < 2:
        raise UserError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    preflight.finite_number("--permute-budget", args.permute_budget, 0)
    if not 0 <= preflight.finite_number("--damp", args.damp) < 10 or args.blocksize < 1:
        raise UserError("--damp must be in [0, 10) and --blocksize >= 1")
    if args.block_epochs < 0 or not 0 < preflight.finite_number("--block-lr", args.block_lr) < 1:
        raise UserError("--block-epochs must be >= 0 and --block-lr in (0, 1)")
    if args.model_epochs < 0 or not 0 < preflight.finite_number("--model-lr", args.model_lr) < 1:
        raise UserError("--model-epochs must be >= 0 and --model-lr in (0, 1)")
    if args.model_epochs and not METHODS[args.method].block_refit:
        raise UserError(f"--model-epochs needs a *-block method (sparsegpt-block, admm-block), not {args.method}")
    spec = None
    if args.quant is not None:
        if type(pattern) is not NM:
            raise UserError(f"--quant needs a plain N:M --pattern (e.g. 2:4), not {pattern}")
        spec = parse_spec(args.quant, args.quant_group, pattern)
        quant_opts = quant_options(args)
    elif args.quant_group is not None:
        raise UserError("--quant-group needs --quant w8 or w4")
    device = preflight.torch_device(args.device)
    method = METHODS[args.method]
    # What killed runs left beside --out first: a complete output needs no resume.
    saved = args.resume and method.calibrated and resume.output_saved(args.out)
    resume.tidy(args.out, _log)
    if saved:
        _log(f"--resume: {args.out} was saved completely before the run was interrupted; nothing to resume")
        return 0
    check_output_dir(args.out, args.overwrite)
    out_parent = preflight.check_writable(args.out)
    preflight.check_model_dir(args.model)  # a local directory: complete and well formed
    source = models.resolve(args.model)
    fp32_bytes = preflight.check_model_dir(source.path, tokenizer=True)
    if method.calibrated:
        resume.check_checkpoint(args.out, args.resume, _log)
    if data.data_dir(args.data_dir) is not None:
        data.check_data_dir(data.data_dir(args.data_dir))
    if args.eval_seqlen < 2 or (args.eval_windows is not None and args.eval_windows < 1):
        raise UserError("--eval-seqlen must be >= 2 and --eval-windows >= 1")
    hidden = preflight.hidden_size(source.path)
    streams_bytes = 2 * args.calib_samples * args.calib_seqlen * (hidden or 0) * 4 if method.calibrated else 0
    streams_bytes *= 2 if method.block_refit else 1  # the dense model's stream is checkpointed beside the pruned one
    # the output (fp32 weights) and, for calibrated methods, the checkpoint beside it
    preflight.check_free_space(out_parent, fp32_bytes * (2 if method.calibrated else 1) + streams_bytes,
                               f"the pruned model{' and its checkpoint' if method.calibrated else ''}")

    t0 = time.perf_counter()
    _log(f"loading {source.name} ({source.description})")
    tokenizer = models.load_tokenizer(source)
    calib_samples, calib_info = None, None
    if method.calibrated or spec is not None:  # before the model loads: a request the data cannot meet fails fast
        calib = calibration.from_args(tokenizer, args, hidden)
        calib_samples, calib_info = calib.samples, calib.info
    model = models.load(source).to(device)
    if layer_plan is not None and set(layer_plan) - {t.name for t in find_targets(model)}:
        missing = sorted(set(layer_plan) - {t.name for t in find_targets(model)})
        raise UserError(f"--plan names layer {missing[0]} which {source.name} does not have; plan this model again")
    find_targets(model, args.include, args.exclude)  # fail on an empty selection before evaluating
    if plan is not None:
        sparsify_plan(model, plan)  # every recipe glob must select a layer
    load_s = time.perf_counter() - t0

    base = models.base_info(source)  # the report names the base, never a local path
    report: dict = {"model": base["name"] if Path(source.name).exists() else source.name, "base": base,
                    "pattern": str(pattern), "method": args.method, "ppl_dense": None, "ppl_sparse": None, "eval": None,
                    "calibration": calib_info}
    eval_s = 0.0
    text = ids = dense_embeddings = second = None
    if not args.no_eval:
        t = time.perf_counter()
        text = data.load_text("test", args.data_dir)
        if source.kind == "causal-lm":
            ids = data.tokenize(tokenizer, text)
            protocol = protocol_for(text, ids, args.eval_seqlen, args.eval_windows)
            cache = DensePerplexityCache()
            key = cache.key(models.materialised_path(source), protocol)
            report["eval"], report["ppl_dense"] = protocol, cache.get(key)
            if report["ppl_dense"] is None:
                _log(f"evaluating dense model on {text.dataset} ({text.source})")
                report["ppl_dense"] = perplexity(model, tokenizer, text, args.eval_seqlen, args.eval_windows,
                                                 ids=ids).ppl
                cache.put(key, report["ppl_dense"])
            else:
                _log("dense perplexity from cache (same weights and protocol; NMKIT_NO_PPL_CACHE=1 disables)")
            if text.dataset != data.SECOND_TEXT:  # offline without WikiText the main text already is it
                second = _SecondText(tokenizer, cache, models.materialised_path(source))
                report["second_text"] = {"eval": second.protocol, "ppl_dense": second.dense(model), "ppl_sparse": None}
        else:
            dense_embeddings = embedding_fidelity(model, tokenizer, text)
        eval_s += time.perf_counter() - t

    options = {"permute": True, "permute_budget_s": args.permute_budget} if args.permute else {}
    if method.calibrated:
        options |= {"calibration": calib_samples, "checkpoint_dir": resume.checkpoint_dir(args.out),
                    "resume": args.resume, "keep_checkpoint": True,
                    "run_config": {"model": source.path, "calibration": calib_info, **resume.run_arguments(vars(args))}}
        options |= {name: getattr(args, name) for name in method.options}
    cpu0 = time.process_time()  # CPU seconds of this process: a load-independent cost of the prune
    if layer_plan is not None:
        options["layer_patterns"] = layer_plan
        report["pattern"] = "mixed"
    if plan is None:
        result = prune(model, pattern, args.method, args.include, args.exclude, tail=args.tail, **options)
    else:
        options = {k: v for k, v in options.items() if k not in ("permute", "permute_budget_s", "calibration")}
        result = sparsify_(model, plan, calibration=calib_samples, **options)
    prune_cpu_s = time.process_time() - cpu0

    if not args.no_eval:
        t = time.perf_counter()
        if source.kind == "causal-lm":
            _log("evaluating sparse model")
            report["ppl_sparse"] = perplexity(model, tokenizer, text, args.eval_seqlen, args.eval_windows,
                                              ids=ids).ppl
            if second is not None:
                report["second_text"]["ppl_sparse"] = second.perplexity(model)
        else:
            fid = embedding_fidelity(model, tokenizer, text, reference=dense_embeddings)
            report["eval"] = fid.protocol
            report["embedding_cosine_mean"] = fid.cosine_mean
            report["embedding_cosine_min"] = fid.cosine_min
        eval_s += time.perf_counter() - t

    report.update({
        "sparsity": result.sparsity,
        "all_valid": result.all_valid,
        "layers": [vars(x) for x in result.layers],
        **({"blocks": result.blocks} if result.blocks else {}),
        **({"model_refit": result.model_refit} if result.model_refit else {}),
        "permutations": _permutation_summary(result.permutations, args.permute_budget) if args.permute else None,
        "timings": {"load_s": round(load_s, 3), "prune_s": round(result.seconds, 3),
                    "prune_cpu_s": round(prune_cpu_s, 3), "eval_s": round(eval_s, 3)},
        "date": now(),
        "machine": machine(),
    })
    targets = {t.name: t for t in find_targets(model, args.include, args.exclude)}
    layers = {x.name: {"pattern": x.pattern, "dim": targets[x.name].reduce_dim, "shape": x.shape}
              for x in result.layers}
    if spec is not None:  # a second calibrated sweep on the pruned model, mask fixed (not inside the prune)
        meta = {"model": source.name, "method": args.method, "pattern": str(pattern), "tail": args.tail,
                "eval": report["eval"], "calibration": calib_info, "layers": layers}
        _log(f"quantizing the kept weights to {spec}")
        mats, quant = quantize_pruned(model, meta, spec, calib_samples, calib_info, args.damp, **quant_opts)
        if not args.no_eval and source.kind == "causal-lm":
            _log("evaluating the quantized model (dequantized weights, fp32 activations)")
            quant["ppl"] = perplexity(model, tokenizer, text, args.eval_seqlen, args.eval_windows, ids=ids).ppl
        report["versions"] = sidecar.versions()
        write_output(args.out, model, tokenizer, meta, mats, quant, report)
        if method.calibrated:  # the quantized output is in place: the pruning checkpoint is no longer needed
            resume.remove(args.out)
        _log(f"wrote {args.out}")
        print(dumps({**report, "quant": quant}, indent=2) if args.json else prune_markdown(report)
              + f"\nquantized {spec}: {quant['bits_per_weight']:.3f} bits per pruned-layer weight"
              + (f", perplexity {quant['ppl']:.4f}" if "ppl" in quant else ""))
        return 0
    report["run_id"] = uuid.uuid4().hex  # lets a later run tell this output from an older one
    try:
        with atomic_directory(args.out, args.overwrite) as tmp:
            model.save_pretrained(tmp)
            faults.point("during-save")
            tokenizer.save_pretrained(tmp)
            sidecar.write(tmp, layers, model=source.name, base=report["base"], method=args.method,
                          pattern=report["pattern"], tail=args.tail, eval=report["eval"], calibration=calib_info,
                          **({"recipe": plan.to_dict()} if plan is not None else {}),
                          **({"plan": args.plan_record} if layer_plan is not None else {}))
            report["versions"] = sidecar.versions()
            (tmp / "report.json").write_text(dumps(report, indent=2) + "\n")
            (tmp / "report.md").write_text(prune_markdown(report))
            if any(x.rel_error is not None for x in result.layers):
                plot_layer_errors(report, tmp / "layer_errors.png")
            model_card.write(tmp)
            if method.calibrated:
                resume.mark_saved(args.out, report["run_id"])
    except Exception as exc:
        failure = write_failure(exc)
        if failure is None:
            raise
        kept = (f"the pruned blocks are kept in {resume.checkpoint_dir(args.out)}: free space and rerun the same "
                "command with --resume" if method.calibrated else "free space and rerun")
        raise UserError(f"cannot write {args.out}: {failure}; {kept}") from None
    faults.point("after-save")
    if method.calibrated:  # only now: until the output is in place, the checkpoint is the work
        resume.remove(args.out)
    _log(f"wrote {args.out}")
    print(dumps(report, indent=2) if args.json else prune_markdown(report))
    return 0


def _read_plan(args: argparse.Namespace) -> dict[str, str]:
    """--plan: the layers it prunes (name -> N:M); sets the method, pattern and selection flags from it."""
    if args.recipe or args.include or args.exclude or args.quant is not None or args.permute:
        raise UserError("--plan chooses each layer's pattern: drop --recipe, --include, --exclude, --quant and "
                        "--permute (quantize afterwards with `nmkit quantize`)")
    body = planfile.read(args.plan)
    if args.method not in ("magnitude", body.get("method")):
        raise UserError(f"--plan {args.plan} was made with {body.get('method')} sensitivities; drop --method "
                        f"{args.method} (or plan again with --method {args.method})")
    args.method = body.get("method") or args.method
    pruned = {name: p for name, p in body["layers"].items() if p != "dense"}
    if not pruned:
        raise UserError(f"--plan {args.plan} keeps every layer dense; there is nothing to prune")
    args.pattern = Counter(pruned.values()).most_common(1)[0][0]
    args.include = sorted(pruned)
    args.plan_record = {"file": str(args.plan), "device": body.get("device"),
                        "target_speedup": body.get("target_speedup"), "predicted": body.get("predicted")}
    return pruned


# Flags that do not change what a prune computes: a resumed run may differ in them.
def _permutation_summary(changes: list, budget_s: float) -> dict:
    """How much more of the method's score N:M keeps after the channel permutations."""
    kept_default = sum(c.kept_default for c in changes)
    return {"layers": len(changes), "budget_s": budget_s,
            "kept_gain": sum(c.kept for c in changes) / kept_default - 1 if kept_default else 0.0,
            "per_layer": [{"name": c.name, "gain": c.gain} for c in changes]}


def _recorded(model: str) -> dict:
    """What ``nmkit prune`` / ``finetune`` recorded in MODEL/nmkit.json ({} for anything else)."""
    path = Path(model).expanduser()
    return sidecar.read(path) if sidecar.exists(path) else {}


def _eval_protocol(args: argparse.Namespace, meta: dict) -> tuple[int, int | None]:
    """--eval-seqlen / --eval-windows, defaulting to the protocol the directory's report used, so
    `nmkit eval DIR` reproduces the number in DIR's report."""
    recorded = meta.get("eval") or {}
    seqlen = args.eval_seqlen if args.eval_seqlen is not None else recorded.get("seqlen", 2048)
    windows = args.eval_windows if args.eval_windows is not None else recorded.get("windows")
    if recorded and (args.eval_seqlen is None or args.eval_windows is None):
        _log(f"protocol from {args.model}/nmkit.json: {windows or 'all'} windows x {seqlen} tokens "
             "(--eval-seqlen/--eval-windows to change)")
    if seqlen < 2 or (windows is not None and windows < 1):
        raise UserError("--eval-seqlen must be >= 2 and --eval-windows >= 1")
    return seqlen, windows


def cmd_eval(args: argparse.Namespace) -> int:



    attention = None if args.attention in (None, "none", "dense") else NM.parse(args.attention)
    activations = None if args.activations is None else NM.parse(args.activations)
    layers = parse_layers(args.attention_layers)
    meta = _recorded(args.model)
    seqlen, windows = _eval_protocol(args, meta)
    recorded = sidecar.runtime_attention(meta) if args.attention is None else None
    if recorded is not None:  # the model was fine-tuned with it; --attention none evaluates without
        attention, layers = NM.parse(recorded["pattern"]), recorded["layers"]
        _log(f"run-time attention {attention} from {args.model}/nmkit.json (--attention none to leave it out)")
    if layers is not None and attention is None:
        raise UserError("--attention-layers needs --attention N:M")
    dynamic = attention is not None or activations is not None
    if args.baseline and not dynamic:
        raise UserError("--baseline compares against run-time sparsity; add --attention or --activations")
    preflight.check_model_dir(args.model)
    source = models.resolve(args.model)
    preflight.check_model_dir(source.path)
    if source.kind != "causal-lm" and not dynamic:
        raise UserError(f"{args.model!r} is not a causal language model; perplexity needs one (an encoder can "
                        "be scored against itself with --attention or --activations)")
    if data.data_dir(args.data_dir) is not None:
        data.check_data_dir(data.data_dir(args.data_dir))
    model, tokenizer = models.load(source), models.load_tokenizer(source)
    text = data.load_text("test", args.data_dir)
    if args.second_text:
        text, seqlen, windows = data.second_text(), data.SECOND_SEQLEN, data.SECOND_WINDOWS

    out: dict = {"model": source.name, "attention": None if attention is None else str(attention),
                 "attention_layers": layers, "activations": None if activations is None else str(activations)}
    if source.kind != "causal-lm":
        reference = embedding_fidelity(model, tokenizer, text)
        with runtime_sparsity(model, attention, layers, activations):
            fid = embedding_fidelity(model, tokenizer, text, reference=reference)
        out |= {"embedding_cosine_mean": fid.cosine_mean, "embedding_cosine_min": fid.cosine_min,
                "eval": fid.protocol}
        summary = (f"{source.name}: embedding cosine vs itself without run-time sparsity: mean "
                   f"{fid.cosine_mean:.5f}, min {fid.cosine_min:.5f} ({fid.protocol['sentences']} sentences)")
    else:
        with runtime_sparsity(model, attention, layers, activations):
            result = perplexity(model, tokenizer, text, seqlen, windows)
        out |= {"ppl": result.ppl, "nll": result.nll, "eval": result.protocol}
        p = result.protocol
        summary = (f"{source.name}: perplexity {result.ppl:.4f} on {p['dataset']} {p['split']} "
                   f"({p['windows']} windows x {p['seqlen']} tokens, source {p['source']})")
        if args.baseline:
            base = perplexity(model, tokenizer, text, seqlen, windows)
            out |= {"ppl_baseline": base.ppl, "ppl_ratio": result.ppl / base.ppl}
            summary += f"; without run-time sparsity {base.ppl:.4f} (x{result.ppl / base.ppl:.3f})"
    if dynamic:
        what = [f"attention {attention}" + ("" if layers is None else f" in layers {args.attention_layers}")
                if attention else "", f"FFN inputs {activations}" if activations else ""]
        summary += "\nrun-time N:M: " + ", ".join(w for w in what if w)
    print(dumps(out, indent=2) if args.json else summary)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    preflight.check_weights(args.dir)
    rows = inspect_directory(args.dir)
    if args.json:
        print(dumps(rows, indent=2))
    else:
        width = max(len(r["name"]) for r in rows)
        print(f"{'layer':<{width}}  {'shape':>11}  pattern  sparsity  valid")
        for r in rows:
            shape = "x".join(map(str, r["shape"]))
            print(f"{r['name']:<{width}}  {shape:>11}  {r['pattern']:>7}  {r['sparsity']:8.4f}  {r['valid']}")
        bad = sum(not r["valid"] for r in rows)
        print(f"{len(rows)} layers, {bad} invalid")
    return 0 if all(r["valid"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.debug:
            raise
        print(f"nmkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nmkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen fault: one line, the traceback on request
        if args.debug:
            raise
        print(f"nmkit {args.command}: unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
