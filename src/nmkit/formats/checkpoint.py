"""Safetensors checkpoint directories, one tensor at a time: read lazily, write in shards.

Exports stream through these so that their memory stays near one shard, whatever the model size,
instead of holding the whole checkpoint (a 7B model is 14-28 GB). Shards follow the Hugging Face
convention: ``model.safetensors`` when one file suffices, else
``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nmkit.errors import UserError
from nmkit.formats import codec as tensor_codec

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 2**30

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """``"500MB"``, ``"2GiB"``, ``"1e9"`` or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read size {text!r}: use a number of bytes or e.g. 500MB, 2GB, 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise UserError(f"size must be positive, got {text!r}")
    return size


class CheckpointReader:
    """The tensors of every ``*.safetensors`` file of a directory, read on demand (``-> CPU``).

    Coded files (:mod:`nmkit.formats.codec`) are decoded tensor by tensor.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"no *.safetensors files in {str(self.directory)!r}")
        self._file: dict[str, Path] = {}
        self._table: dict[Path, dict | None] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                self._table[f] = tensor_codec.table_from_metadata(fh.metadata())
                for k in fh.keys():
                    if k in self._file:
                        raise UserError(f"tensor {k!r} is stored twice ({self._file[k].name} and {f.name})")
                    self._file[k] = f

    def names(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def get(self, name: str) -> torch.Tensor:
        f = self._file[name]
        with safe_open(str(f), framework="pt") as fh:
            t = fh.get_tensor(name)
        table = self._table[f]
        return tensor_codec.decode({name: t}, table)[name] if table else t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._file:
            yield name, self.get(name)

    def read_all(self) -> dict[str, torch.Tensor]:
        return dict(self.items())


class ShardedWriter:
    """Collects tensors and writes a shard whenever ``max_shard_bytes`` of them are waiting.

    ``codec="zstd"`` codes each shard (its table goes into that shard's metadata). Call
    :meth:`close` at the end: it names the shards and writes the index when there are several.
    """

    def __init__(self, directory: Path, metadata: dict[str, str], codec: str = "none",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if codec not in tensor_codec.CODECS:
            raise UserError(f"unknown codec {codec!r}; choose one of {', '.join(tensor_codec.CODECS)}")
        self.directory, self.metadata, self.codec = Path(directory), metadata, codec
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._added: set[str] = set()  # every name so far, pending or written
        self.tensor_bytes = 0  # uncoded bytes of everything added
        self._stored_bytes = 0  # bytes of the tensors as written (coded: the blobs)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._added:
            raise ValueError(f"tensor {name!r} added twice")
        self._added.add(name)
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.tensor_bytes += size

    def _flush(self) -> None:
        tensors, metadata = self._pending, dict(self.metadata)
        if self.codec == "zstd":
            tensors, table = tensor_codec.encode(tensors)
            metadata[tensor_codec.METADATA_KEY] = json.dumps(table, separators=(",", ":"))
        self._stored_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is left and give the shards their final names; returns the files."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.directory / WEIGHTS
            self._shards[0][0].rename(final)
            return [final]
        files, weight_map = [], {}
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self._stored_bytes}, "weight_map": weight_map}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


__all__ = ["DEFAULT_SHARD_BYTES", "INDEX", "WEIGHTS", "CheckpointReader", "ShardedWriter", "parse_size"]
