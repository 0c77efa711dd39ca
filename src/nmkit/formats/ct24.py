"""Read back the legacy compressed-tensors ``sparse-24-bitmask`` layout that ``nmkit export`` writes,
one layer at a time and without the compressed-tensors package (see :mod:`nmkit.formats.io`)."""

from __future__ import annotations

import torch

from nmkit.errors import UserError
from nmkit.formats.checkpoint import CheckpointReader
from nmkit.formats.nm import unpack_bits

STORAGE = "compressed-tensors-24"  # the sidecar's "storage" of such a directory


def stored(reader: CheckpointReader, name: str) -> bool:
    return all(f"{name}.{part}" in reader for part in ("compressed", "bitmask", "shape"))


def layer_weight(reader: CheckpointReader, name: str) -> torch.Tensor:
    """Layer ``name``'s dense weight (zeros in place) from its ``compressed`` / ``bitmask`` / ``shape``."""
    if not stored(reader, name):
        raise UserError(f"{reader.directory}: layer {name} has no {name}.compressed/.bitmask/.shape tensors; "
                        "the compressed-tensors-24 export is incomplete: export it again")
    rows, cols = (int(v) for v in reader.get(f"{name}.shape").flatten())
    mask = unpack_bits(reader.get(f"{name}.bitmask"), cols)
    values = reader.get(f"{name}.compressed")
    if mask.shape != (rows, cols) or int(mask.sum()) != values.numel():
        raise UserError(f"{reader.directory}: layer {name}: bitmask and values do not match its shape "
                        f"({rows}, {cols}); the file is damaged: export it again")
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values.flatten()
    return dense


def dense_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a ``sparse-24-bitmask`` directory, pruned layers as dense ``P.weight``."""
    reader = CheckpointReader(directory)
    layers = {k[: -len(".bitmask")] for k in reader.names() if k.endswith(".bitmask")}
    parts = {f"{n}.{p}" for n in layers for p in ("compressed", "bitmask", "shape")}
    out = {k: reader.get(k) for k in reader.names() if k not in parts}
    out |= {f"{n}.weight": layer_weight(reader, n) for n in sorted(layers)}
    return out
