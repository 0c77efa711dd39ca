"""Check a saved pruned model against its sidecar: every listed layer's weight, read back from disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from nmkit import sidecar
from nmkit.errors import UserError
from nmkit.patterns import summarize


def _weight_files(directory: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file (single file or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / v for k, v in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{str(directory)!r} has no model.safetensors (or index); was it saved by `nmkit prune`?")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _stored_weight(files: dict[str, Path], name: str, layer: dict, meta: dict, directory: Path) -> torch.Tensor:
    """The layer's weight as stored: dense, or decompressed from nmkit's values + bitmask."""
    if meta.get("storage") == "nmkit-compressed":
        from nmkit.formats.nm import NMTensor, decompress
        from nmkit.patterns import NM

        keys = (f"{name}.weight_values", f"{name}.weight_mask")
        if not all(k in files for k in keys):
            raise UserError(f"{directory}: layer {name} is listed in {sidecar.SIDECAR} but not stored compressed")
        with safe_open(files[keys[0]], framework="pt") as f:
            values, mask = f.get_tensor(keys[0]), f.get_tensor(keys[1])
        return decompress(NMTensor(values=values, mask=mask, shape=tuple(layer["shape"]),
                                   pattern=NM.parse(layer["pattern"])))
    key = f"{name}.weight"
    if key not in files:
        raise UserError(f"{directory}: layer {name} is listed in {sidecar.SIDECAR} but {key} is not stored")
    with safe_open(files[key], framework="pt") as f:
        return f.get_tensor(key)


def inspect_directory(directory: str | Path) -> list[dict]:
    """Per-layer {name, shape, pattern, sparsity, valid, violating_groups} computed from the stored weights."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory")
    meta = sidecar.read(directory)
    files = _weight_files(directory)
    rows = []
    for name, layer in meta["layers"].items():
        weight = _stored_weight(files, name, layer, meta, directory)
        info = summarize(weight, layer["pattern"], dim=layer.get("dim", -1), tail=meta.get("tail", "error"))
        rows.append({"name": name, **info})
    return rows
