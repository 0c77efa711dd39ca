"""One-shot pruning of a whole model to an N:M (or other) pattern."""

from nmkit.oneshot.prune import prune
from nmkit.oneshot.results import LayerResult, PruneResult
from nmkit.oneshot.targets import Target, find_targets

__all__ = ["LayerResult", "PruneResult", "Target", "find_targets", "prune"]
