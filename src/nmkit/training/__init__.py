"""Sparse training with N:M masks: STE, SR-STE, S-STE, decaying masks, flip rate, LoRA, inheritance.

"N:M" keeps N of every M consecutive weights along the input dimension. Masks are attached with
``torch.nn.utils.parametrize``; nothing is monkey-patched.
"""

from nmkit.training.bidirectional import BidirectionalLinear, bidirectional_linear
from nmkit.training.core import METHODS, History, SparseOptimizer, SparseTraining
from nmkit.training.inheritance import inherit_family, is_subset
from nmkit.training.lora import add_sparse_lora, merge_sparse_lora
from nmkit.training.masks import magnitude_mask, soft_threshold
from nmkit.training.monitor import plot_history
from nmkit.training.schedule import Schedule

__all__ = [
    "METHODS",
    "BidirectionalLinear",
    "History",
    "Schedule",
    "SparseOptimizer",
    "SparseTraining",
    "add_sparse_lora",
    "bidirectional_linear",
    "inherit_family",
    "is_subset",
    "magnitude_mask",
    "merge_sparse_lora",
    "plot_history",
    "soft_threshold",
]
