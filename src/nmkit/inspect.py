"""Check a saved pruned model against its sidecar: every listed layer's weight, read back from disk."""

from __future__ import annotations

from pathlib import Path

import torch

from nmkit import sidecar
from nmkit.errors import UserError
from nmkit.formats import ct24
from nmkit.formats.checkpoint import CheckpointReader
from nmkit.formats.io import decompress_stored
from nmkit.patterns import summarize


def _stored_weight(reader: CheckpointReader, name: str, layer: dict, meta: dict, directory: Path) -> torch.Tensor:
    """The layer's weight as stored: dense, or decompressed from nmkit's values + bitmask."""
    if meta.get("storage") == ct24.STORAGE:
        return ct24.layer_weight(reader, name)
    if meta.get("storage") == "nmkit-compressed":
        if not all(f"{name}.weight_{kind}" in reader for kind in ("values", "mask")):
            raise UserError(f"{directory}: layer {name} is listed in {sidecar.SIDECAR} but not stored compressed")
        return decompress_stored(reader, name, layer)
    key = f"{name}.weight"
    if key not in reader:
        raise UserError(f"{directory}: layer {name} is listed in {sidecar.SIDECAR} but {key} is not stored")
    return reader.get(key)


def inspect_directory(directory: str | Path) -> list[dict]:
    """Per-layer {name, shape, pattern, sparsity, valid, violating_groups} computed from the stored weights."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory")
    meta = sidecar.read(directory)
    reader = CheckpointReader(directory)  # single file or shards, codec-coded or not
    rows = []
    for name, layer in meta["layers"].items():
        weight = _stored_weight(reader, name, layer, meta, directory)
        info = summarize(weight, layer["pattern"], dim=layer.get("dim", -1), tail=meta.get("tail", "error"))
        rows.append({"name": name, **info})
    return rows
