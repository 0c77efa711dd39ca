"""Run-time (dynamic) N:M sparsity: attention scores (DFSS) and layer inputs, pruned on every call."""

from nmkit.dynamic.activations import NMActivations, ffn_down_projections, prune_activations
from nmkit.dynamic.attention import NMAttention, nm_attention, score_mask
from nmkit.dynamic.context import runtime_sparsity

__all__ = ["NMActivations", "NMAttention", "ffn_down_projections", "nm_attention", "prune_activations",
           "runtime_sparsity", "score_mask"]
