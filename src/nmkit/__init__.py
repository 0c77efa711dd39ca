"""nmkit: N:M structured sparsity for PyTorch.

"N:M" means keep N of every M consecutive weights along the reduction dimension.
"""

from nmkit.patterns import NM, Dense, Pattern, Unstructured, parse
from nmkit.solvers import mask_for, nm_mask

__version__ = "0.1.0"

__all__ = ["NM", "Dense", "Pattern", "Unstructured", "parse", "mask_for", "nm_mask", "__version__"]
