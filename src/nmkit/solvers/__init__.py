"""Mask solvers: given scores and a pattern, find the mask that keeps the most score."""

from nmkit.solvers.nm import mask_for, nm_mask, topk_mask

__all__ = ["mask_for", "nm_mask", "topk_mask"]
