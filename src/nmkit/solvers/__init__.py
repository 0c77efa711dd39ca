"""Mask solvers: given scores and a pattern, find the mask that keeps the most score."""

from nmkit.solvers.dispatch import mask_for
from nmkit.solvers.nm import nm_mask, topk_mask

__all__ = ["mask_for", "nm_mask", "topk_mask"]

# Pattern-zoo solvers (issue 3): transposable N:M, channel permutations, V:N:M, HiNM, balanced,
# tile-wise, TASD.
from nmkit.solvers.balanced import balanced_mask, tile_wise_mask  # noqa: E402
from nmkit.solvers.hinm import hinm_mask, hinm_permute  # noqa: E402
from nmkit.solvers.permutation import PermutationResult, permute_channels  # noqa: E402
from nmkit.solvers.tasd import TASDResult, tasd_decompose  # noqa: E402
from nmkit.solvers.transposable import transposable_mask  # noqa: E402
from nmkit.solvers.vnm import vnm_mask, vnm_permute  # noqa: E402

__all__ += [
    "PermutationResult",
    "TASDResult",
    "balanced_mask",
    "hinm_mask",
    "hinm_permute",
    "permute_channels",
    "tasd_decompose",
    "tile_wise_mask",
    "transposable_mask",
    "vnm_mask",
    "vnm_permute",
]
