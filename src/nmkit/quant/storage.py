"""The quantized N:M directory format (``storage: "nmkit-quantized"`` in nmkit.json, quant version 3).

A transformers directory (config, tokenizer) whose ``model.safetensors`` holds every tensor of the
model as is, except the quantized layers, which hold the codes the runtime multiplies by
(:mod:`nmkit.runtime.pack`), so the engine uses them without re-rounding:

- ``{layer}.weight_values``: each row's kept codes in order: int8 (INT8), rows x kept per row, or uint8
  nibble pairs (INT4), rows x kept per row / 2, code 2i in the low nibble of byte i (as code + 8, or as
  its index in the level table)
- ``{layer}.weight_mask``: uint8 N:M bitmask, rows x cols/8 (absent for a dense layer)
- ``{layer}.weight_scales``: fp16, rows x scale groups
- ``{layer}.weight_levels``: int8 (16,), only for INT4 with a level table: a code n stands for levels[n]
  instead of n - 8

Versions 1 and 2 (still read) stored the values in the runtime's own layout, whole 64-value units per
row: a 576-input 2:4 row's 288 kept values took 320 slots, 0.17 bits per weight of padding on
SmolLM2. Version 3 stores no padding; the reader lays the units out again (layer format
``nm-quantized-rows`` in config.json, ``nm-quantized`` before).

``config.json`` carries the ``quantization_config`` block of :mod:`nmkit.formats.hf_config` (layer format
``nm-quantized``), so ``AutoModelForCausalLM.from_pretrained`` with nmkit imported loads the directory
(dequantized, as :func:`load_quantized_model`), and the 0-element guard tensors make transformers
without nmkit fail instead of loading random weights for the quantized layers.

nmkit.json's ``layers`` entry of each quantized layer adds ``kind`` (int8/int4), ``group_blocks`` and
``bits_per_weight`` (values + mask + scales on disk over rows x cols).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nmkit import model_card, sidecar
from nmkit.compressed_model import dense_model
from nmkit.errors import UserError
from nmkit.formats import hf_config
from nmkit.outputs import atomic_directory
from nmkit.patterns import NM
from nmkit.quant.gptq import QuantizedLayer
from nmkit.runtime.pack import PackedMat, from_codes, symbol_units, unit_symbols

FORMAT_VERSION = 3  # 2 added the optional level tables; 3 stores the values without the runtime's unit padding
READABLE_VERSIONS = (1, 2, 3)
WEIGHTS = "model.safetensors"
_PARTS = ("values", "mask", "scales", "levels")


def packed_layer(layer: QuantizedLayer, bias: torch.Tensor | None = None) -> PackedMat:
    return from_codes(layer.codes, layer.scales, layer.keep, layer.pattern, layer.spec.bits, layer.spec.group_blocks,
                      bias, layer.spec.levels)


def stored_values(mat: PackedMat) -> torch.Tensor:
    """``weight_values`` as version 3 stores it: each row's kept codes in order, no unit padding."""
    symbols = unit_symbols(mat.values, mat.kind, mat.kept_per_row)
    if mat.kind == "int4":
        symbols = symbols[:, 0::2] | (symbols[:, 1::2] << 4)
    return symbols.contiguous()


def runtime_values(stored: torch.Tensor, mat: PackedMat) -> torch.Tensor:
    """The inverse of :func:`stored_values`: the runtime's units for ``mat`` (its shape, kind and levels)."""
    symbols = stored
    if mat.kind == "int4":
        symbols = torch.stack([stored & 15, stored >> 4], dim=-1).reshape(stored.shape[0], -1)
    if tuple(symbols.shape) != (mat.rows, mat.kept_per_row):
        raise UserError(f"stored values of shape {tuple(stored.shape)} do not fit a {mat.rows}x{mat.cols} "
                        f"{mat.pattern or 'dense'} {mat.kind} weight: the file is damaged; re-run `nmkit quantize`")
    return symbol_units(symbols, mat.kind, mat.levels is not None)


def packed_from_stored(layer: dict, parts: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> PackedMat:
    """A quantized layer's PackedMat from its config/sidecar entry and stored tensors (``values``, ``mask``,
    ``scales``, ``levels``), bit for bit as written; versions 1-2 stored the runtime layout itself."""
    rows, cols = layer["shape"]
    pattern = None if layer["pattern"] == "dense" else NM.parse(layer["pattern"])
    mat = PackedMat(layer["kind"], rows, cols, pattern, parts["values"], parts.get("mask"), parts["scales"],
                    None if bias is None else bias.float().contiguous(), layer["group_blocks"], parts.get("levels"))
    if hf_config.layer_format(layer) == hf_config.NM_QUANTIZED_ROWS:
        mat.values = runtime_values(parts["values"], mat)
    return mat


def bits_per_weight(mat: PackedMat) -> float:
    """Stored bits (values as version 3 stores them, mask, scales, level table; no bias) per weight."""
    value_bits = mat.rows * mat.kept_per_row * (8 if mat.kind == "int8" else 4)  # stored_values' size
    parts = (mat.mask, mat.scales, mat.levels)
    return (value_bits + 8 * sum(t.numel() * t.element_size() for t in parts if t is not None)) / (mat.rows * mat.cols)


def _plain_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    tensors = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        if name in skip or t.data_ptr() in seen:  # tied weights (the LM head) are stored once
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().cpu().contiguous()
    return tensors


def write_quantized(out: str | Path, model: nn.Module, layers: dict[str, PackedMat], meta: dict,
                    tokenizer=None, extra_files: dict[str, str] | None = None) -> None:
    """Write the directory atomically (temp sibling, renamed). ``meta``: the source's sidecar body (its
    ``layers`` give pattern/dim/shape) plus a ``quant`` record; ``extra_files``: name -> text (reports)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = _plain_tensors(model, {f"{name}.weight" for name in layers})
    entries = dict(meta.get("layers") or {})
    for name, mat in layers.items():
        for part in _PARTS:
            t = stored_values(mat) if part == "values" else getattr(mat, part)
            if t is not None:
                tensors[f"{name}.weight_{part}"] = t.contiguous()
        entries[name] = {**entries.get(name, {"pattern": str(mat.pattern) if mat.pattern else "dense", "dim": 1,
                                              "shape": [mat.rows, mat.cols]}),
                         "format": hf_config.NM_QUANTIZED_ROWS, "kind": mat.kind, "group_blocks": mat.group_blocks,
                         "levels": mat.levels is not None, "bits_per_weight": round(bits_per_weight(mat), 4)}
    for guard in hf_config.guard_names(layers):
        tensors[guard] = torch.empty(0, dtype=torch.uint8)
    with atomic_directory(out, overwrite=True) as tmp:  # the old directory stays whole until the new one is in
        model.config.save_pretrained(tmp)
        hf_config.write(tmp / "config.json", hf_config.quantization_config({n: entries[n] for n in layers}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        body = {k: v for k, v in meta.items() if k not in ("format", "version", "versions", "layers")}
        sidecar.write(tmp, entries, **{**body, "storage": sidecar.STORAGE_QUANTIZED})
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        model_card.write(tmp)  # last: it reads nmkit.json and report.json


def _check(directory: Path) -> dict:
    meta = sidecar.read(directory)
    if meta.get("storage") != sidecar.STORAGE_QUANTIZED:
        raise UserError(f"{str(directory)!r} is not a quantized nmkit directory (storage={meta.get('storage')!r})")
    version = (meta.get("quant") or {}).get("version")
    if version not in READABLE_VERSIONS:
        raise UserError(f"{str(directory)!r} uses quantized format version {version!r}; this nmkit reads "
                        f"versions {', '.join(map(str, READABLE_VERSIONS))}: upgrade nmkit or re-run `nmkit quantize`")
    return meta


def read_packed(directory: str | Path) -> tuple[dict[str, PackedMat], dict[str, torch.Tensor], dict]:
    """The quantized layers as PackedMats (bit for bit as stored), the other tensors, and nmkit.json."""
    directory = Path(directory)
    meta = _check(directory)
    tensors = load_file(str(directory / WEIGHTS))
    for guard in hf_config.guard_names(meta["layers"]):  # only for transformers without nmkit
        tensors.pop(guard, None)
    mats = {}
    for name, layer in meta["layers"].items():
        if "kind" not in layer:
            continue
        parts = {part: tensors.pop(f"{name}.weight_{part}") for part in _PARTS if f"{name}.weight_{part}" in tensors}
        mats[name] = packed_from_stored(layer, parts, tensors.get(f"{name}.bias"))
    return mats, tensors, meta


def load_quantized_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model whose quantized layers hold their dequantized weights (zeros where pruned)."""
    from transformers import AutoConfig

    mats, tensors, _ = read_packed(directory)
    config = AutoConfig.from_pretrained(directory)
    for name, mat in mats.items():
        tensors[f"{name}.weight"] = mat.dense_weight().to(dtype)
    return dense_model(directory, config, tensors, dtype)
