"""Compressed N:M storage: the canonical values + bitmask layout, safetensors I/O and export."""

from nmkit.formats.blocked import BlockedNM, from_blocked, to_blocked, zeros_blocked
from nmkit.formats.nm import NMTensor, compress, decompress, pack_bits, padded_cols, unpack_bits, zeros

__all__ = [
    "BlockedNM",
    "from_blocked",
    "to_blocked",
    "NMTensor",
    "compress",
    "decompress",
    "pack_bits",
    "padded_cols",
    "unpack_bits",
    "zeros",
    "zeros_blocked",
]
