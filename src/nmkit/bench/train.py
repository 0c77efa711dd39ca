"""``nmkit bench train``: N:M training methods on a tiny character GPT trained from scratch on WikiText-2.

Every method sees the same initial weights, batch order, optimiser and LR schedule for a given seed,
so differences between methods are paired. The sparse methods are evaluated with the weights they
would deploy (hard N:M, or beta * soft threshold for sste); ``srste_df`` ends with a dense phase and
is evaluated dense (labelled so), with its N:M projection reported too. This measures optimisation
quality, not speed: there are no sparse training kernels on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from nmkit.data import load_text
from nmkit.errors import UserError
from nmkit.training import Schedule, SparseTraining, plot_history
from nmkit.training.core import History
from nmkit.training.permutation import PermuteConfig, l1_l2_penalty
from nmkit.training.sparse_ffn import VNMActivationTraining, as_vnm
from nmkit.training.tinygpt import CharVocab, TinyGPT

ALL_METHODS = ("dense", "ste", "srste", "sste", "decay", "srste_df")
PERMUTES = ("none", "oneshot", "learned", "padst", "dynamic")
# Paired comparisons reported per pattern: (a, b) -> a - b.
PAIRS = (
    ("ste", "dense"),
    ("srste", "ste"),
    ("sste", "ste"),
    ("decay", "ste"),
    ("srste_df", "ste"),
    ("sste", "decay"),
    ("decay", "srste"),
    ("sste", "srste"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patterns", default="2:4,1:8", help="comma-separated N:M (keep N of M) (default 2:4,1:8)")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"subset of {','.join(ALL_METHODS)}")
    p.add_argument(
        "--permute",
        default="none",
        help="comma-separated input permutations per sparse method: none, oneshot (searched once on the "
        "initial |W|), learned (Sinkhorn-relaxed, anchored at the identity, hardened at --harden-at), padst "
        "(random start, no anchor, L1-L2 penalty ramped to --permute-penalty, hardened at --harden-at), dynamic "
        "(the search re-run every 50 steps until --harden-at); labelled METHOD+PERMUTE",
    )
    p.add_argument("--harden-at", type=float, default=0.5, help="learned: fraction of steps to harden at (0.5)")
    p.add_argument(
        "--permute-lr-mult", type=float, default=10.0, help="learned: logits' lr / --lr (default 10; no decay)"
    )
    p.add_argument("--permute-block", type=int, default=128, help="learned: permutation window (default 128)")
    p.add_argument(
        "--permute-init-diag", type=float, default=0.9, help="learned: soft permutation's diagonal at start (0.9)"
    )
    p.add_argument("--permute-penalty", type=float, default=0.3, help="padst: final weight of the L1-L2 penalty (0.3)")
    p.add_argument(
        "--permute-init-scale", type=float, default=6.0, help="padst: std of the random initial logits (6.0)"
    )
    p.add_argument("--permute-tau", type=float, default=1.0, help="padst: Sinkhorn temperature, fixed (1.0)")
    p.add_argument(
        "--ffn-activations",
        default="none",
        help="comma-separated V:N:M patterns (or none) for the FFN layers' inputs (fc, out), chosen every step "
        "and kept at evaluation (nmkit.training.sparse_ffn); labelled METHOD/V:N:M",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per run (default 300)")
    p.add_argument("--d", type=int, default=128, help="model width (default 128)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=64, help="context length in characters (default 64)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--srste-lambda", type=float, default=2e-4, help="masked decay for srste (default 2e-4)")
    p.add_argument("--eval-batches", type=int, default=40, help="fixed validation batches (default 40)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared box, 2 threads oversubscribe)",
    )
    p.add_argument("--data-dir", default=None, help="folder with wikitext-2-raw/ (default $NMKIT_DATA)")
    p.add_argument("--out", default=None, metavar="DIR", help="write results.json, table.md and curves_*.png")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of Markdown")


def _load_text(data_dir: str | None) -> tuple[str, str, str]:
    train, valid = load_text("train", data_dir), load_text("valid", data_dir)
    return train.text, valid.text, f"{train.dataset} ({train.source})"


def _lr(step: int, total: int, base: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _sparse_for(
    method: str, model: TinyGPT, pattern: str, steps: int, lam: float, permute: str = "none", **permute_kw
) -> SparseTraining:
    include = ["blocks.*"]
    if permute != "none":
        # fc -> GELU -> out: the out layer's input order is absorbed into fc's rows at finalize.
        producers = {f"blocks.{i}.out": [f"blocks.{i}.fc"] for i in range(len(model.blocks))}
        cfg = PermuteConfig(producers=producers, **permute_kw)
        kw = {"permute": permute, "permute_config": cfg}
        if method == "srste":
            kw["masked_decay"] = lam
        if method in ("ste", "srste", "sste"):
            return SparseTraining(
                model, pattern, method=method, include=include, schedule=Schedule(total_steps=steps), **kw
            )
        raise UserError(f"--permute is wired for ste, srste and sste, not {method!r}")
    if method == "dense":  # masks only tracked (virtual), forward dense: flip-rate reference
        return SparseTraining(model, pattern, method="dense", include=include)
    if method == "srste_df":
        sched = Schedule(total_steps=steps, dense_finetune=1 / 6, dense_start="masked", decay=None)
        return SparseTraining(model, pattern, method="srste", include=include, schedule=sched, masked_decay=lam)
    if method == "decay":  # MdGf-exp: alpha = exp(-7 t / T_d), T_d = steps / 2
        sched = Schedule(total_steps=steps, decay="exp", decay_coef=7.0, decay_end=0.5)
        return SparseTraining(model, pattern, method="decay", include=include, schedule=sched)
    kw = {"masked_decay": lam} if method == "srste" else {}
    return SparseTraining(model, pattern, method=method, include=include, **kw)


@torch.no_grad()
def _evaluate(model: TinyGPT, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(model.loss(b)) for b in batches) / len(batches)
    model.train()
    return loss


def run_one(method: str, pattern: str, seed: int, args, train_ids, val_batches, vocab: int) -> dict:
    label = method
    method, _, activations = method.partition("/")
    method, _, permute = method.partition("+")
    permute = permute or "none"
    torch.manual_seed(seed)
    model = TinyGPT(vocab, args.d, args.layers, args.heads, args.ctx)
    permute_kw = {
        "harden_at": getattr(args, "harden_at", 0.5),
        "block": getattr(args, "permute_block", 128),
        "init_diag": getattr(args, "permute_init_diag", 0.9),
    }
    if permute == "padst":  # learned keeps tau_start 1.0 (annealed); padst's is fixed
        permute_kw.update(
            penalty=getattr(args, "permute_penalty", 0.3),
            init_scale=getattr(args, "permute_init_scale", 6.0),
            tau_start=getattr(args, "permute_tau", 1.0),
            tau_end=getattr(args, "permute_tau", 1.0),
            seed=seed,
        )
    sparse = _sparse_for(method, model, pattern, args.steps, args.srste_lambda, permute, **permute_kw)
    if activations:  # after the weight masks, so the wrappers read the parametrized weights
        VNMActivationTraining(model, activations, targets=["blocks.*.fc", "blocks.*.out"])
    perm_params = sparse.permutation_parameters()
    perm_ids = {id(p) for p in perm_params}
    params = [p for p in model.parameters() if id(p) not in perm_ids]
    groups = [{"params": params, "lr_mult": 1.0}]
    if perm_params:  # logits: own rate, no weight decay (it would pull the soft permutation to uniform)
        groups.append({"params": perm_params, "lr_mult": getattr(args, "permute_lr_mult", 10.0), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sparse.bind_optimizer(opt)  # permute=dynamic re-orders AdamW's moments with the weight columns
    gen = torch.Generator().manual_seed(1000 + seed)  # batch order depends on the seed only
    starts = torch.randint(0, len(train_ids) - args.ctx - 1, (args.steps, args.batch), generator=gen)
    offsets = torch.arange(args.ctx + 1)
    softness = {}  # step -> mean L1-L2 penalty of the soft permutations (0: already permutations)
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.steps, args.lr) * g["lr_mult"]
        loss = model.loss(train_ids[starts[step][:, None] + offsets])
        if perm_params and step % 50 == 0 and not any(bool(w.hardened) for w in sparse.permuted.values()):
            with torch.no_grad():
                softness[step] = statistics.fmean(float(l1_l2_penalty(w.soft())) for w in sparse.permuted.values())
        (loss + sparse.permutation_penalty()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # not the logits: their gradient scales with 1 / tau
        sparse.before_optimizer_step()  # masked decay after clipping, before AdamW (Hu et al.)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sparse.step(loss.item())
    wall = time.perf_counter() - t0
    history = sparse.history
    result = {"method": label, "pattern": pattern, "seed": seed, "wall_s": round(wall, 2)}
    if sparse.permuted:
        moved = [float((w.perm != torch.arange(len(w.perm))).float().mean()) for w in sparse.permuted.values()]
        result["perm_moved"] = statistics.fmean(moved)  # share of inputs not in their own place
        # share of inputs not where the start pointed (learned: the identity; padst: the random start)
        result["perm_moved_from_start"] = statistics.fmean(
            float((w.perm != w.start_perm).float().mean()) for w in sparse.permuted.values()
        )
        if softness:
            result["perm_softness"] = softness
    if method in ("dense", "srste_df"):
        result["val_loss_dense"] = _evaluate(model, val_batches)
    if sparse.permuted:
        with torch.no_grad():  # the exported model must compute what was trained
            probe = val_batches[0][:4, :-1]
            trained = model(probe)
    report = sparse.finalize()
    if sparse.permuted:
        with torch.no_grad():
            result["export_max_abs_diff"] = float((model(probe) - trained).abs().max())
        result["permute_layers"] = report["permute"]["layers"]
    result["nm_valid"] = report["valid"]
    result["val_loss_nm"] = _evaluate(model, val_batches)
    # Each method is scored the way it is meant to be deployed (see module docs).
    result["val_loss"] = result["val_loss_dense"] if method in ("dense", "srste_df") else result["val_loss_nm"]
    rates = history.flip_rate
    result["flip_rate_mean"] = statistics.fmean(rates) if rates else 0.0
    result["flip_rate_final"] = rates[-1] if rates else 0.0
    result["history"] = {
        "loss": history.loss,
        "flip_rate": history.flip_rate,
        "flip_steps": history.flip_steps,
    }
    return result


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict]) -> dict:
    """Mean/std per (pattern, method) and paired differences with standard errors."""
    summary: dict = {}
    for pattern in dict.fromkeys(r["pattern"] for r in results):
        rows = [r for r in results if r["pattern"] == pattern]
        by = {}
        for r in rows:
            by.setdefault(r["method"], {})[r["seed"]] = r
        table = {}
        for method, seeds in by.items():
            mean, std = _stats([r["val_loss"] for r in seeds.values()])
            table[method] = {
                "val_loss_mean": mean,
                "val_loss_std": std,
                "n": len(seeds),
                "val_loss_nm_mean": _stats([r["val_loss_nm"] for r in seeds.values()])[0],
                "flip_rate_mean": _stats([r["flip_rate_mean"] for r in seeds.values()])[0],
                "wall_s_mean": _stats([r["wall_s"] for r in seeds.values()])[0],
                "nm_valid": all(r["nm_valid"] for r in seeds.values()),
            }
            if all("perm_moved" in r for r in seeds.values()):
                table[method]["perm_moved_mean"] = _stats([r["perm_moved"] for r in seeds.values()])[0]
                table[method]["perm_moved_from_start_mean"] = _stats(
                    [r.get("perm_moved_from_start", 0.0) for r in seeds.values()]
                )[0]
                table[method]["export_max_abs_diff"] = max(r["export_max_abs_diff"] for r in seeds.values())
        pairs = {}
        extra = []
        for label in by:
            if "/" in label:  # V:N:M FFN activations against the same method without them
                extra.append((label, label.partition("/")[0]))
                continue
            base, _, permute = label.partition("+")
            if permute == "learned":
                extra += [(label, base), (label, f"{base}+oneshot")]
            elif permute == "oneshot":
                extra.append((label, base))
            elif permute == "padst":
                extra += [(label, base), (label, f"{base}+oneshot"), (label, f"{base}+learned")]
            elif permute == "dynamic":
                extra += [(label, base), (label, f"{base}+oneshot"), (label, f"{base}+learned")]
        for a, b in (*PAIRS, *extra):
            if a in by and b in by:
                common = sorted(set(by[a]) & set(by[b]))
                diffs = [by[a][s]["val_loss"] - by[b][s]["val_loss"] for s in common]
                if len(diffs) < 2:
                    continue
                mean, std = _stats(diffs)
                se = std / math.sqrt(len(diffs))
                pairs[f"{a} - {b}"] = {
                    "mean": mean,
                    "se": se,
                    "n": len(diffs),
                    "beyond_2se": abs(mean) > 2 * se,
                }
        summary[pattern] = {"methods": table, "paired": pairs}
    return summary


# The papers' prediction at high sparsity: sste <= decay ~ srste < ste (lower loss is better).
ORDERING = (
    ("srste - ste", "<", "srste < ste"),
    ("decay - ste", "<", "decay < ste"),
    ("sste - ste", "<", "sste < ste"),
    ("sste - decay", "<=", "sste <= decay"),
    ("decay - srste", "~", "decay ~ srste"),
)


def ordering_check(paired: dict) -> list[str]:
    """One line per predicted relation: reproduced beyond 2 SE, or not (with the paired mean and SE)."""
    lines = []
    for key, rel, label in ORDERING:
        d = paired.get(key)
        if d is None:
            continue
        if rel == "<":
            ok = d["mean"] < 0 and d["beyond_2se"]
        elif rel == "<=":
            ok = not (d["mean"] > 0 and d["beyond_2se"])  # not significantly worse
        else:
            ok = not d["beyond_2se"]
        if rel == "<":
            verdict = "reproduced" if ok else "not reproduced"
        else:  # no significant difference only means "consistent", not proven
            verdict = "consistent" if ok else "contradicted"
        lines.append(f"- {label}: {key} = {d['mean']:+.4f} ± {d['se']:.4f} (SE, n={d['n']}): {verdict}")
    return lines


def markdown(summary: dict, meta: dict) -> str:
    lines = [
        f"Tiny char GPT (d={meta['d']}, {meta['layers']} layers, ctx {meta['ctx']}, batch {meta['batch']}, "
        f"{meta['steps']} steps, AdamW lr {meta['lr']}), data {meta['data']}, seeds {meta['seeds']}, "
        f"{meta['threads']} threads. Validation loss in nats/char on {meta['eval_batches']} fixed batches.",
        "",
    ]
    for pattern, s in summary.items():
        lines += [
            f"**{pattern}** (keep {pattern.split(':')[0]} of {pattern.split(':')[1]})",
            "",
            "| method | val loss (mean ± std) | N:M-projected val loss | mean flip rate / step | "
            "wall s / run | N:M valid |",
            "|---|---|---|---|---|---|",
        ]
        for method, t in sorted(s["methods"].items(), key=lambda kv: kv[1]["val_loss_mean"]):
            label = method + (" (evaluated dense)" if method in ("dense", "srste_df") else "")
            lines.append(
                f"| {label} | {t['val_loss_mean']:.4f} ± {t['val_loss_std']:.4f} | "
                f"{t['val_loss_nm_mean']:.4f} | {t['flip_rate_mean']:.2e} | {t['wall_s_mean']:.1f} | {t['nm_valid']} |"
            )
        for method, t in s["methods"].items():
            if "perm_moved_mean" in t:
                lines.append(
                    f"- {method}: {t['perm_moved_mean']:.1%} of inputs moved "
                    f"({t['perm_moved_from_start_mean']:.1%} from where the start pointed); exported model vs trained "
                    f"function, max |diff| {t['export_max_abs_diff']:.1e}"
                )
        lines += ["", "| paired difference (a - b) | mean | SE | beyond 2 SE |", "|---|---|---|---|"]
        for name, d in s["paired"].items():
            lines.append(f"| {name} | {d['mean']:+.4f} | {d['se']:.4f} | {'yes' if d['beyond_2se'] else 'no'} |")
        check = ordering_check(s["paired"])
        if check:
            lines += ["", "Predicted ordering (sste <= decay ~ srste < ste), paired, 2 SE rule:", *check]
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise UserError(f"unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    permutes = [p.strip() for p in args.permute.split(",") if p.strip()]
    if set(permutes) - set(PERMUTES) or not permutes:
        raise UserError(f"--permute takes a comma-separated subset of {', '.join(PERMUTES)}, got {args.permute!r}")
    # Every sparse method runs once per permutation; dense has no mask to permute.
    methods = [m if p == "none" else f"{m}+{p}" for m in methods for p in permutes if p == "none" or m != "dense"]
    activations = [a.strip() for a in args.ffn_activations.split(",") if a.strip()]
    for a in activations:
        if a != "none":
            as_vnm(a)  # one clear line for a bad pattern before any training
    methods = [m if a == "none" else f"{m}/{a}" for m in methods for a in activations]
    seeds = [int(s) for s in args.seeds.split(",")]
    train_text, valid_text, data_name = _load_text(args.data_dir)
    vocab = CharVocab(train_text)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(valid_text)
    n = args.ctx + 1
    windows = val_ids[: (len(val_ids) // n) * n].view(-1, n)
    val_batches = list(windows[: args.eval_batches * args.batch].split(args.batch))
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    meta = {
        k: getattr(args, k)
        for k in (
            "steps",
            "d",
            "layers",
            "heads",
            "ctx",
            "batch",
            "lr",
            "threads",
            "eval_batches",
            "srste_lambda",
            "permute",
            "harden_at",
            "permute_lr_mult",
            "permute_block",
            "permute_init_diag",
            "permute_penalty",
            "permute_init_scale",
            "permute_tau",
            "ffn_activations",
        )
    }
    meta.update(data=data_name, seeds=seeds, vocab=len(vocab), torch=torch.__version__)
    results = []
    t_all = time.perf_counter()
    for seed in seeds:
        for pattern in patterns:
            for method in methods:
                if method == "dense" and pattern != patterns[0]:
                    # The dense run does not depend on the pattern except for its virtual masks: reuse it.
                    prev = next(r for r in results if r["method"] == "dense" and r["seed"] == seed)
                    results.append({**prev, "pattern": pattern})
                    continue
                r = run_one(method, pattern, seed, args, train_ids, val_batches, len(vocab))
                results.append(r)
                print(
                    f"nmkit: bench train {pattern} {method:9s} seed {seed}: val {r['val_loss']:.4f} "
                    f"(nm {r['val_loss_nm']:.4f}) flip {r['flip_rate_mean']:.2e} {r['wall_s']:.1f}s"
                    + (
                        f" moved {r['perm_moved']:.1%} ({r['perm_moved_from_start']:.1%} from start)"
                        if "perm_moved" in r
                        else ""
                    ),
                    file=sys.stderr,
                    flush=True,
                )
                if out:
                    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    meta["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    summary = summarize(results)
    if out:
        (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
        (out / "table.md").write_text(markdown(summary, meta))
        for pattern in patterns:
            curves = {}
            for r in results:
                if r["pattern"] == pattern and r["seed"] == seeds[0]:
                    h = r["history"]
                    curves[r["method"]] = History(
                        loss_steps=list(range(1, len(h["loss"]) + 1)),
                        loss=h["loss"],
                        flip_steps=h["flip_steps"],
                        flip_rate=h["flip_rate"],
                    )
            plot_history(
                curves,
                out / f"curves_{pattern.replace(':', '-')}.png",
                title=f"tiny GPT, {pattern}, seed {seeds[0]}",
            )
    if args.json:
        print(json.dumps({"meta": meta, "summary": summary}, indent=1))
    else:
        print(markdown(summary, meta))
    return 0
