"""Lossless entropy coding of checkpoint tensors (``nmkit export --format nmkit --codec zstd``).

Each tensor is split into byte planes (byte ``j`` of every element), and each plane is compressed
with Zstandard on its own. Floats compress well this way because their high byte (sign and
exponent) carries only ~2.5 bits of information for trained weights, while the mantissa bytes are
near-random and are stored almost as they are. The N:M bitmask of a 2:4 weight holds one of 6
patterns per 4 bits and compresses to ~0.65 bits per weight. ZipNN (Hershcovitch et al., 2024)
measured the same byte-plane effect on whole models.

The coded file is still a plain safetensors file: every tensor keeps its name but becomes a 1-D
uint8 tensor (its planes one after another). The ``__metadata__`` entry ``nmkit_codec`` records,
per tensor, the dtype, the shape and the compressed length of each plane. Decoding is bit exact
(NaN payloads and ``-0.0`` included).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from nmkit.errors import UserError

CODECS = ("none", "zstd")
METADATA_KEY = "nmkit_codec"
DEFAULT_LEVEL = 1  # on SmolLM2 (bf16 and fp32) level 1 is both faster and smaller than 3 and 9

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool)}


def _zstd():
    try:
        import zstandard
    except ImportError as e:  # the optional extra nmkit[codec]
        raise UserError("the zstd codec needs the `zstandard` package: pip install 'nmkit[codec]'") from e
    return zstandard


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # safetensors stores little-endian; the planes assume it
        raise UserError("the zstd codec supports little-endian machines only")


def _planes(t: torch.Tensor) -> np.ndarray:
    """(element_size, numel) uint8: row j holds byte j of every element."""
    size = t.element_size()
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(raw.reshape(-1, size).T)


def encode(tensors: dict[str, torch.Tensor], level: int = DEFAULT_LEVEL) -> tuple[dict[str, torch.Tensor], dict]:
    """Byte-plane Zstandard coding of every tensor: ``(coded uint8 tensors, table for the metadata)``."""
    _check_byteorder()
    dtype_names = {v: k for k, v in _DTYPES.items()}
    compressor = _zstd().ZstdCompressor(level=level)
    coded: dict[str, torch.Tensor] = {}
    table: dict[str, dict] = {}
    for name, t in tensors.items():
        if t.dtype not in dtype_names:
            raise UserError(f"the zstd codec cannot store tensor {name!r} of dtype {t.dtype}; "
                            f"supported: {', '.join(sorted(_DTYPES))}")
        blobs = [compressor.compress(plane.tobytes()) for plane in _planes(t)]
        coded[name] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)  # >= 1 frame header
        table[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "planes": [len(b) for b in blobs]}
    return coded, table


def decode(coded: dict[str, torch.Tensor], table: dict) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode`; tensors missing from ``table`` are returned unchanged."""
    _check_byteorder()
    decompressor = _zstd().ZstdDecompressor()
    out: dict[str, torch.Tensor] = {}
    for name, t in coded.items():
        entry = table.get(name)
        if entry is None:
            out[name] = t
            continue
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        size = torch.empty(0, dtype=dtype).element_size()
        numel = int(np.prod(shape, dtype=np.int64))
        blob = memoryview(t.contiguous().numpy())  # no copy: the stored bytes may be a view of a mapped file
        flat = np.empty(numel * size, dtype=np.uint8)
        elements = flat.reshape(numel, size)  # plane j lands in column j: no planes array, no transpose copy
        start = 0
        for j, length in enumerate(entry["planes"]):
            try:
                piece = decompressor.decompress(blob[start:start + length], max_output_size=numel)
            except Exception as e:  # zstandard.ZstdError and friends: bad or truncated frame
                raise UserError(f"tensor {name!r}: byte plane {j} does not decode ({e}); the file is damaged") from e
            if len(piece) != numel:
                raise UserError(f"tensor {name!r}: byte plane {j} decodes to {len(piece)} bytes, expected "
                                f"{numel}; the file is damaged")
            elements[:, j] = np.frombuffer(piece, dtype=np.uint8)
            start += length
        raw = torch.from_numpy(flat)  # element after element
        out[name] = raw.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    return out


def table_from_metadata(metadata: dict[str, str] | None) -> dict | None:
    """The codec table stored in a safetensors file's metadata, or None for an uncoded file."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    return json.loads(metadata[METADATA_KEY])


__all__ = ["CODECS", "DEFAULT_LEVEL", "METADATA_KEY", "decode", "encode", "table_from_metadata"]
