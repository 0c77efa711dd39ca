"""``nmkit.json``: the sparsity sidecar saved next to a pruned model (pattern per layer, provenance).

The one module that reads and writes it: everything else goes through :func:`read`, :func:`write`
and :func:`rewrite`, so the format check is never skipped.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import nmkit
from nmkit.errors import UserError
from nmkit.jsonout import dumps

SIDECAR = "nmkit.json"
FORMAT = "nmkit-sparsity"
VERSION = 1
# How a directory stores its pruned layers ("storage"; absent means dense, as `nmkit prune` writes).
STORAGE_DENSE = "dense"
STORAGE_NMKIT = "nmkit-compressed"
STORAGE_QUANTIZED = "nmkit-quantized"  # INT8/INT4 kept values in the runtime's layouts (nmkit.quant.storage)


def versions() -> dict:
    import torch
    import transformers  # optional-cost import: only when provenance is written

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
    path.write_text(dumps(body, indent=2) + "\n")
    return path


def rewrite(directory: str | Path, sidecar: dict, **changes) -> Path:
    """Write a sidecar read from another directory, with ``changes`` (e.g. a new ``storage``), as is."""
    path = Path(directory) / SIDECAR
    path.write_text(dumps({**sidecar, **changes}, indent=2) + "\n")
    return path


def exists(directory: str | Path) -> bool:
    return (Path(directory) / SIDECAR).is_file()


def read(directory: str | Path, needed_by: str | None = None) -> dict:
    """The sidecar of ``directory``, checked to be one. ``needed_by`` names the command in the error."""
    path = Path(directory) / SIDECAR
    if not path.is_file():
        if needed_by:
            raise UserError(f"{str(directory)!r} has no {SIDECAR}: {needed_by} needs a directory written by "
                            "`nmkit prune` (it names the pruned layers and their N:M pattern)")
        raise UserError(f"{str(directory)!r} has no {SIDECAR}; is it a directory written by `nmkit prune`?")
    try:
        body = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); restore it from the original output") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise UserError(f"{path} is not an nmkit sparsity sidecar (format="
                        f"{body.get('format') if isinstance(body, dict) else None!r})")
    return body


def runtime_attention(meta: dict) -> dict | None:
    """The run-time N:M attention a model was fine-tuned with ({"pattern", "layers"}), if any."""
    attention = (meta.get("runtime") or {}).get("attention")
    return dict(attention) if attention else None


def stores_compressed(directory: str | Path) -> bool:
    """True for a directory written by ``nmkit export --format nmkit`` (pruned layers stored compressed)."""
    path = Path(directory) / SIDECAR
    return path.is_file() and json.loads(path.read_text()).get("storage") == STORAGE_NMKIT


def stores_quantized(directory: str | Path) -> bool:
    """True for a directory written by ``nmkit quantize`` (INT8/INT4 kept values, nmkit.quant.storage)."""
    path = Path(directory) / SIDECAR
    return path.is_file() and json.loads(path.read_text()).get("storage") == STORAGE_QUANTIZED
