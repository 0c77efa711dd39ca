"""Run reports: one JSON-able dict per run, rendered to Markdown for people."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

import torch

from nmkit.calibration import describe as describe_calibration


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
    ]
    if "embedding_cosine_mean" in report:  # encoders: fidelity of sentence embeddings to the dense model
        lines += [f"| embedding cosine to dense, mean | {_fmt(report['embedding_cosine_mean'], 4)} |",
                  f"| embedding cosine to dense, min | {_fmt(report['embedding_cosine_min'], 4)} |"]
    else:
        lines += [f"| perplexity, dense | {_fmt(report.get('ppl_dense'))} |",
                  f"| perplexity, sparse | {_fmt(report.get('ppl_sparse'))} |"]
    if report.get("ppl_dense") and report.get("ppl_sparse"):
        lines.append(f"| increase | {report['ppl_sparse'] - report['ppl_dense']:+.3f} "
                     f"({report['ppl_sparse'] / report['ppl_dense']:.3f}x) |")
    second = report.get("second_text")
    if second and second.get("ppl_sparse"):
        e = second["eval"]
        lines.append(f"| second text ({e['dataset']}, {e['windows']} x {e['seqlen']}): dense / sparse | "
                     f"{_fmt(second['ppl_dense'])} / {_fmt(second['ppl_sparse'])} "
                     f"({second['ppl_sparse'] / second['ppl_dense']:.3f}x) |")
    lines += [
        f"| layers pruned | {len(report['layers'])} (all valid: {report['all_valid']}) |",
        f"| time: load / prune / eval (s) | {t['load_s']:.1f} / {t['prune_s']:.1f} / {t['eval_s']:.1f} |",
    ]
    if ev and "windows" in ev:
        lines += [
            "",
            f"Evaluation: {ev['dataset']} {ev['split']} split ({ev['source']}, sha256 {ev['sha256'][:12]}...), "
            f"{ev['windows']} windows x {ev['seqlen']} tokens = {ev['tokens']} tokens "
            f"of {ev['text_tokens']}.",
        ]
    elif ev:
        lines += ["", f"Evaluation: mean-pooled sentence embeddings of the first {ev['sentences']} lines of at least "
                      f"40 characters of {ev['dataset']} {ev['split']} ({ev['source']}), up to {ev['max_tokens']} "
                      f"tokens each."]
    cal = report.get("calibration")
    if cal:
        lines += ["", f"Calibration: {describe_calibration(cal)}."]
    fits = report.get("blocks")
    if fits:
        kept = [b["output_mse_after"] / b["output_mse_before"] for b in fits if b["output_mse_before"] > 0]
        lines += ["", f"Block fit to the dense model's block outputs ({len(fits)} blocks): the output error left after "
                      f"the layer solves fell to {sum(kept) / max(len(kept), 1):.1%} of it on average "
                      f"(calibration data)."]
    perm = report.get("permutations")
    if perm:
        lines += ["", f"Channel permutations (--permute, {perm['budget_s']:g} s per layer): {perm['layers']} layers, "
                      f"N:M keeps {perm['kept_gain']:+.2%} more of the method's score."]
    errors = [x["rel_error"] for x in report["layers"] if x.get("rel_error") is not None]
    if errors:
        lines += ["", f"Layer reconstruction error ||(W-W')X||^2/||WX||^2 on calibration data: "
                      f"mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f} (plot: layer_errors.png)."]
    shown = report["layers"][:8]
    err = bool(errors)  # the error column only when it was measured
    lines += ["", "| layer | shape | sparsity | valid |" + (" rel. error |" if err else ""),
              "|---|---|---|---|" + ("---|" if err else "")]
    lines += [f"| {x['name']} | {'x'.join(map(str, x['shape']))} | {x['sparsity']:.4f} | {x['valid']} |"
              + (f" {_fmt(x.get('rel_error'), 4)} |" if err else "") for x in shown]
    if len(report["layers"]) > len(shown):
        lines.append(f"| ... {len(report['layers']) - len(shown)} more in report.json | | | |" + (" |" if err else ""))
    return "\n".join(lines) + "\n"


def plot_layer_errors(report: dict, path) -> bool:
    """PNG of each pruned layer's reconstruction error, in model order, one line per layer kind.

    Returns False (and says which extra to install) when matplotlib, the optional extra nmkit[plots],
    is missing: the figures are in report.json either way, so the run is not lost for a picture."""
    try:
        import matplotlib
    except ImportError:
        print(f"nmkit: {Path(path).name} not written: matplotlib is missing; pip install 'nmkit[plots]'",
              file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for i, layer in enumerate(report["layers"]):
        if layer.get("rel_error") is not None:
            kind = layer["name"].rsplit(".", 1)[-1]
            series.setdefault(kind, []).append((i, layer["rel_error"]))
    fig, ax = plt.subplots(figsize=(9, 4))
    for kind, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("||(W-W')X||² / ||WX||²")
    ax.set_title(f"{report['model']} {report['pattern']} {report['method']}: per-layer reconstruction error")
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
