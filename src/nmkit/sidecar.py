"""``nmkit.json``: the sparsity sidecar saved next to a pruned model (pattern per layer, provenance)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

SIDECAR = "nmkit.json"
FORMAT = "nmkit-sparsity"
VERSION = 1


def versions() -> dict:
    import torch
    import transformers

    import nmkit

    return {
        "nmkit": nmkit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write(directory: str | Path, layers: dict[str, dict], **extra) -> Path:
    """Write the sidecar. ``layers`` maps module name -> {"pattern", "dim", "shape", ...}; ``dim`` is
    the weight dimension the N:M groups run along (the input dim)."""
    body = {"format": FORMAT, "version": VERSION, **extra, "versions": versions(), "layers": layers}
    path = Path(directory) / SIDECAR
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def read(directory: str | Path) -> dict:
    from nmkit.errors import UserError

    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise UserError(f"{str(directory)!r} has no {SIDECAR}; is it a directory written by `nmkit prune`?")
    body = json.loads(path.read_text())
    if body.get("format") != FORMAT:
        raise UserError(f"{path} is not an nmkit sparsity sidecar (format={body.get('format')!r})")
    return body


def runtime_attention(meta: dict) -> dict | None:
    """The run-time N:M attention a model was fine-tuned with ({"pattern", "layers"}), if any."""
    attention = (meta.get("runtime") or {}).get("attention")
    return dict(attention) if attention else None
