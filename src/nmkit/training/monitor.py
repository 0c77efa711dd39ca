"""Monitoring output: a PNG of loss and flip rate over steps (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

from nmkit.training.core import History


def plot_history(history: History | dict[str, History], path: str | Path, title: str = "") -> Path:
    """Write a two-panel PNG (loss; flip rate, log scale) for one run or ``{label: History}``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = history if isinstance(history, dict) else {"": history}
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_flip = fig.subplots(1, 2)
    for label, h in runs.items():
        if h.loss:
            ax_loss.plot(h.loss_steps, h.loss, label=label or None, linewidth=0.8)
        if h.flip_rate:
            rates = [max(r, 1e-7) for r in h.flip_rate]  # log axis: show zero flips at the floor
            ax_flip.plot(h.flip_steps, rates, label=label or None, linewidth=0.8)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_flip.set(xlabel="step", ylabel="flips / weights per update", yscale="log", title="flip rate")
    if any(runs):
        ax_flip.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
