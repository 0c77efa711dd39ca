"""The ``quantization_config`` block that marks an nmkit export in ``config.json`` (no transformers import).

Transformers reads it to pick the loader: with nmkit imported, :mod:`nmkit.hf_quantizer` builds the
stored layers straight from the file. Each layer names its stored format, so a new kind of layer
(e.g. quantized N:M) is a new format name, and an older nmkit says plainly that it cannot read it.
"""

from __future__ import annotations

import json
from pathlib import Path

QUANT_METHOD = "nmkit"
FORMAT_VERSION = 1
NM_BITMASK = "nm-bitmask"  # canonical kept values + 1-bit mask (nmkit.formats.nm): P.weight_values, P.weight_mask


def quantization_config(layers: dict[str, dict], codec: str = "none") -> dict:
    """The block for an export whose ``layers`` (sidecar entries: pattern, shape) are stored compressed."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "codec": codec,
        "layers": {name: {"format": layer.get("format", NM_BITMASK), "pattern": layer["pattern"],
                          "shape": [int(s) for s in layer["shape"]]} for name, layer in sorted(layers.items())},
    }


def guard_name(layer: str) -> str:
    """The 0-element tensor stored under a compressed layer's dense weight name: stock transformers
    (without nmkit) stops on its size instead of loading random weights; nmkit's readers skip it."""
    return f"{layer}.weight"


def write(config_json: Path, block: dict | None) -> None:
    """Set (or with ``None`` remove) the ``quantization_config`` of ``config_json``, if it exists."""
    if not config_json.is_file():
        return
    cfg = json.loads(config_json.read_text())
    if block is None:
        if (cfg.get("quantization_config") or {}).get("quant_method") != QUANT_METHOD:
            return
        cfg.pop("quantization_config")
    else:
        cfg["quantization_config"] = block
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


__all__ = ["FORMAT_VERSION", "NM_BITMASK", "QUANT_METHOD", "guard_name", "quantization_config", "write"]
