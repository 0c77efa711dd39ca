"""Run-time (dynamic) sparsity: N:M attention scores (DFSS) and layer inputs, pruned on every call, and
attention that skips the key blocks a block-sparse mask removes."""

from nmkit.dynamic.activations import NMActivations, ffn_down_projections, prune_activations
from nmkit.dynamic.attention import NMAttention, nm_attention, score_mask
from nmkit.dynamic.block_mask import BlockMask, causal_mask, document_mask, select_blocks
from nmkit.dynamic.block_sparse import BlockAttention, block_attention
from nmkit.dynamic.context import runtime_sparsity

__all__ = ["BlockAttention", "BlockMask", "NMActivations", "NMAttention", "block_attention", "causal_mask",
           "document_mask", "ffn_down_projections", "nm_attention", "prune_activations", "runtime_sparsity",
           "score_mask", "select_blocks"]
