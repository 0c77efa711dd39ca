"""Run reports: one JSON-able dict per run, rendered to Markdown for people."""

from __future__ import annotations

import datetime as _dt
import os
import platform

import torch


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def prune_markdown(report: dict) -> str:
    """Human-readable summary of a `nmkit prune` report."""
    ev = report.get("eval") or {}
    t = report["timings"]
    lines = [
        f"# nmkit prune: {report['model']} -> {report['pattern']} ({report['method']})",
        "",
        f"N:M means keep N of every M consecutive weights along the input dimension; "
        f"{report['pattern']} leaves {report['sparsity']:.2%} of the pruned layers' weights at zero.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| perplexity, dense | {_fmt(report.get('ppl_dense'))} |",
        f"| perplexity, sparse | {_fmt(report.get('ppl_sparse'))} |",
    ]
    if report.get("ppl_dense") and report.get("ppl_sparse"):
        lines.append(f"| increase | {report['ppl_sparse'] - report['ppl_dense']:+.3f} "
                     f"({report['ppl_sparse'] / report['ppl_dense']:.3f}x) |")
    lines += [
        f"| layers pruned | {len(report['layers'])} (all valid: {report['all_valid']}) |",
        f"| time: load / prune / eval (s) | {t['load_s']:.1f} / {t['prune_s']:.1f} / {t['eval_s']:.1f} |",
    ]
    if ev:
        lines += [
            "",
            f"Evaluation: {ev['dataset']} {ev['split']} split ({ev['source']}, sha256 {ev['sha256'][:12]}...), "
            f"{ev['windows']} windows x {ev['seqlen']} tokens = {ev['tokens']} tokens "
            f"of {ev['text_tokens']}.",
        ]
    shown = report["layers"][:8]
    lines += ["", "| layer | shape | sparsity | valid |", "|---|---|---|---|"]
    lines += [f"| {x['name']} | {'x'.join(map(str, x['shape']))} | {x['sparsity']:.4f} | {x['valid']} |"
              for x in shown]
    if len(report["layers"]) > len(shown):
        lines.append(f"| ... {len(report['layers']) - len(shown)} more in report.json | | | |")
    return "\n".join(lines) + "\n"
