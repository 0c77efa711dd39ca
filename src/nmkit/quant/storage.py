"""The quantized N:M directory format (``storage: "nmkit-quantized"`` in nmkit.json, quant version 1).

A transformers directory (config, tokenizer) whose ``model.safetensors`` holds every tensor of the
model as is, except the quantized layers, which are stored in the runtime's packed layouts
(:mod:`nmkit.runtime.pack`) so the engine uses them without re-rounding:

- ``{layer}.weight_values``: int8 codes (INT8) or uint8 nibble pairs (INT4), rows x 64-value units
- ``{layer}.weight_mask``: uint8 N:M bitmask, rows x cols/8 (absent for a dense layer)
- ``{layer}.weight_scales``: fp16, rows x scale groups
- ``{layer}.weight_levels``: int8 (16,), only for INT4 with a level table (quant version 2): a code n
  stands for levels[n] instead of n - 8

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
from nmkit.runtime.pack import PackedMat, from_codes

FORMAT_VERSION = 2  # 2 added the optional level tables; a directory without them is written as version 1
READABLE_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
_PARTS = ("values", "mask", "scales", "levels")


def format_version(layers: dict[str, PackedMat]) -> int:
    """The oldest version that describes these layers (older readers keep reading what they can)."""
    return 2 if any(m.levels is not None for m in layers.values()) else 1


def packed_layer(layer: QuantizedLayer, bias: torch.Tensor | None = None) -> PackedMat:
    return from_codes(layer.codes, layer.scales, layer.keep, layer.pattern, layer.spec.bits, layer.spec.group_blocks,
                      bias, layer.spec.levels)


def bits_per_weight(mat: PackedMat) -> float:
    """Stored bits (values, mask, scales; no bias) per weight of the rows x cols matrix."""
    parts = (mat.values, mat.mask, mat.scales, mat.levels)
    return 8 * sum(t.numel() * t.element_size() for t in parts if t is not None) / (mat.rows * mat.cols)


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
            t = getattr(mat, part)
            if t is not None:
                tensors[f"{name}.weight_{part}"] = t.contiguous()
        entries[name] = {**entries.get(name, {"pattern": str(mat.pattern) if mat.pattern else "dense", "dim": 1,
                                              "shape": [mat.rows, mat.cols]}),
                         "kind": mat.kind, "group_blocks": mat.group_blocks, "levels": mat.levels is not None,
                         "bits_per_weight": round(bits_per_weight(mat), 4)}
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
        rows, cols = layer["shape"]
        pattern = None if layer["pattern"] == "dense" else NM.parse(layer["pattern"])
        values = tensors.pop(f"{name}.weight_values")
        mask = tensors.pop(f"{name}.weight_mask", None)
        scales = tensors.pop(f"{name}.weight_scales")
        levels = tensors.pop(f"{name}.weight_levels", None)
        bias = tensors.get(f"{name}.bias")
        mats[name] = PackedMat(layer["kind"], rows, cols, pattern, values, mask, scales,
                               None if bias is None else bias.float().contiguous(), layer["group_blocks"], levels)
    return mats, tensors, meta


def load_quantized_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model whose quantized layers hold their dequantized weights (zeros where pruned)."""
    from transformers import AutoConfig

    mats, tensors, _ = read_packed(directory)
    config = AutoConfig.from_pretrained(directory)
    for name, mat in mats.items():
        tensors[f"{name}.weight"] = mat.dense_weight().to(dtype)
    return dense_model(directory, config, tensors, dtype)
