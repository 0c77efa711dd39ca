"""The ``quantization_config`` block that marks an nmkit export in ``config.json`` (no transformers import).

Transformers reads it to pick the loader: with nmkit imported, :mod:`nmkit.hf_quantizer` builds the
stored layers straight from the file. Each layer names its stored format, so a new kind of layer is a
new format name, and an older nmkit says plainly that it cannot read it. The formats:

- ``nm-bitmask`` (``nmkit export --format nmkit``): canonical kept values + 1-bit mask
  (:mod:`nmkit.formats.nm`), stored as ``P.weight_values`` and ``P.weight_mask``;
- ``nm-quantized-rows`` (``nmkit quantize``): INT8/INT4 codes row by row, the mask (absent for a dense
  layer) and fp16 group scales (:mod:`nmkit.quant.storage`), stored as ``P.weight_values``,
  ``P.weight_mask`` and ``P.weight_scales`` (and ``P.weight_levels``, an INT4 level table, when the
  entry's ``levels`` is true); the entry adds ``kind``, ``group_blocks`` and ``levels``;
- ``nm-quantized``: the same with the values in the runtime's padded 64-value units (quantized
  versions 1-2, still read).
"""

from __future__ import annotations

import json
from pathlib import Path

QUANT_METHOD = "nmkit"
FORMAT_VERSION = 1
NM_BITMASK = "nm-bitmask"
NM_QUANTIZED = "nm-quantized"
NM_QUANTIZED_ROWS = "nm-quantized-rows"
QUANTIZED_FORMATS = (NM_QUANTIZED, NM_QUANTIZED_ROWS)
# A 0-element tensor stored under this name in every nmkit file. transformers without nmkit lists it as an
# UNEXPECTED key in the load report it prints before failing, so the failure says what to install; with
# nmkit the quantizer expects it. No dots: it is a key at the model's root.
INSTALL_HINT = "THIS IS AN NMKIT FILE: pip install nmkit, then import nmkit before from_pretrained"


def layer_format(layer: dict) -> str:
    """The stored format of a sidecar layer entry (quantized entries carry ``kind``)."""
    return layer.get("format") or (NM_QUANTIZED if "kind" in layer else NM_BITMASK)


def _entry(layer: dict) -> dict:
    fmt = layer_format(layer)
    entry = {"format": fmt, "pattern": layer["pattern"], "shape": [int(s) for s in layer["shape"]]}
    if fmt in QUANTIZED_FORMATS:
        entry.update(kind=layer["kind"], group_blocks=int(layer["group_blocks"]), levels=bool(layer.get("levels")))
    return entry


def quantization_config(layers: dict[str, dict], codec: str = "none") -> dict:
    """The block for an export whose ``layers`` (sidecar entries: pattern, shape) are stored compressed."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "codec": codec,
        "layers": {name: _entry(layer) for name, layer in sorted(layers.items())},
    }


def guard_name(layer: str) -> str:
    """The 0-element tensor stored under a compressed layer's dense weight name: stock transformers
    (without nmkit) stops on its size instead of loading random weights; nmkit's readers skip it."""
    return f"{layer}.weight"


def guard_names(layers) -> set[str]:
    """Every tensor name an nmkit file stores only for transformers without nmkit (readers skip them)."""
    return {guard_name(name) for name in layers} | {INSTALL_HINT}


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


__all__ = ["FORMAT_VERSION", "INSTALL_HINT", "NM_BITMASK", "NM_QUANTIZED", "NM_QUANTIZED_ROWS", "QUANTIZED_FORMATS",
           "QUANT_METHOD", "guard_name", "guard_names", "layer_format", "quantization_config", "write"]
