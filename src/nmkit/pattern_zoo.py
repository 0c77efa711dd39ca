"""The patterns beyond row-wise N:M, under their historical import path.

They are defined in :mod:`nmkit.patterns` with the others (one module describes every pattern, one
:func:`~nmkit.patterns.parse` reads them all); this module re-exports them for existing imports.
"""

from nmkit.patterns import VNM, Balanced, HiNM, TileWise, Transposable, ZooPattern

__all__ = ["Transposable", "VNM", "HiNM", "Balanced", "TileWise", "ZooPattern"]
