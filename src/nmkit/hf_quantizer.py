"""``quant_method: "nmkit"``: transformers' ``from_pretrained`` builds nmkit exports with SparseLinear layers.

``nmkit export --format nmkit`` writes a ``quantization_config`` block into ``config.json``
(:func:`nmkit.formats.hf_config.quantization_config`). With nmkit imported, :func:`register` has added
:class:`NmkitConfig` and :class:`NmkitHfQuantizer` to transformers' tables, and
``AutoModelForCausalLM.from_pretrained(dir)``:

1. builds the model skeleton; before any weight is read, each stored layer becomes a placeholder
   whose buffers carry the stored names (``weight_values``, ``weight_mask``), so transformers' own
   loader fills them with the compressed tensors as they are on disk (no dense copy);
2. after loading, each placeholder becomes the module its stored layer format names
   (:data:`LAYER_FORMATS`): :class:`nmkit.nn.SparseLinear` for ``"nm-bitmask"`` (``nmkit export``),
   an ``nn.Linear`` holding the dequantized weight for ``"nm-quantized-rows"`` (``nmkit quantize``; and
   the older ``"nm-quantized"``; the same values as :func:`nmkit.quant.storage.load_quantized_model`).

Coded files (``--codec zstd``) hold every tensor as a byte blob: the quantizer lets each blob in as it
is (``param_needs_quantization``: shapes are not checked) and decodes them one by one afterwards.

Without nmkit, transformers does not know ``quant_method: "nmkit"``, so every export also stores a
0-element ``P.weight`` per compressed layer: stock transformers then stops with a size-mismatch error
instead of loading random weights (nmkit's own readers skip these guards). transformers' exception
text cannot be set from a checkpoint; what names nmkit is its log: "Unknown quantization type, got
nmkit" and, in the load report printed just before the error, the 0-element tensor
:data:`~nmkit.formats.hf_config.INSTALL_HINT`, whose name says what to install.

A new stored layer kind is one more entry in :data:`LAYER_FORMATS`: the tensor suffixes it stores
and a function that builds its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from nmkit.formats import codec as tensor_codec
from nmkit.formats.hf_config import (
    FORMAT_VERSION,
    INSTALL_HINT,
    NM_BITMASK,
    NM_QUANTIZED,
    NM_QUANTIZED_ROWS,
    QUANT_METHOD,
)
from nmkit.formats.mapped import ReleaseQueue
from nmkit.formats.nm import NMTensor
from nmkit.nn import SparseLinear
from nmkit.patterns import NM
from nmkit.quant.storage import packed_from_stored


@dataclass(frozen=True)
class LayerFormat:
    """How one kind of stored layer is laid out and which module it becomes."""

    suffixes: Callable[[dict], tuple[str, ...]]  # stored tensors of layer P (its config entry), as P.weight<suffix>
    build: Callable[[dict, dict[str, torch.Tensor], torch.Tensor | None, torch.dtype], nn.Module]


def _build_nm_bitmask(layer: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                      dtype: torch.dtype) -> nn.Module:
    pattern = NM.parse(layer["pattern"])
    out_features, in_features = layer["shape"]
    t = NMTensor(values=tensors["_values"].to(dtype), mask=tensors["_mask"], shape=(out_features, in_features),
                 pattern=pattern)
    t.validate()
    with torch.device("meta"):  # no zero-filled shell: load_compressed brings the real tensors
        mod = SparseLinear(in_features, out_features, pattern, bias=bias is not None, dtype=dtype)
    mod.load_compressed(t)
    if bias is not None:
        mod.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return mod


def _build_nm_quantized(layer: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                        dtype: torch.dtype) -> nn.Module:
    """A dense Linear holding the dequantized weight (zeros where pruned), as nmkit.load builds it."""
    rows, cols = layer["shape"]
    mat = packed_from_stored(layer, {suffix[1:]: t for suffix, t in tensors.items()})
    with torch.device("meta"):
        mod = nn.Linear(cols, rows, bias=bias is not None, dtype=dtype)
    mod.weight = nn.Parameter(mat.dense_weight().to(dtype), requires_grad=False)
    if bias is not None:
        mod.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return mod


def _quantized_suffixes(layer: dict) -> tuple[str, ...]:
    parts = ("_values", "_scales") if layer["pattern"] == "dense" else ("_values", "_mask", "_scales")
    return parts + (("_levels",) if layer.get("levels") else ())


# Stored layer format -> layout and builder (see nmkit.formats.hf_config for the formats).
LAYER_FORMATS: dict[str, LayerFormat] = {
    NM_BITMASK: LayerFormat(suffixes=lambda layer: ("_values", "_mask"), build=_build_nm_bitmask),
    NM_QUANTIZED: LayerFormat(suffixes=_quantized_suffixes, build=_build_nm_quantized),
    NM_QUANTIZED_ROWS: LayerFormat(suffixes=_quantized_suffixes, build=_build_nm_quantized),
}


class NmkitConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an nmkit export, as transformers holds it."""

    def __init__(self, format_version: int = FORMAT_VERSION, codec: str = "none", layers: dict | None = None,
                 **kwargs) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.codec = codec
        self.layers = dict(layers or {})
        self.post_init()

    def post_init(self) -> None:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"this checkpoint uses nmkit format version {self.format_version}; the installed "
                             f"nmkit reads up to {FORMAT_VERSION}: pip install --upgrade nmkit")
        for name, layer in self.layers.items():
            if layer.get("format") not in LAYER_FORMATS:
                raise ValueError(f"layer {name} is stored as {layer.get('format')!r}, which this nmkit cannot "
                                 f"read (known: {', '.join(LAYER_FORMATS)}): pip install --upgrade nmkit")
        if self.codec not in tensor_codec.CODECS:
            raise ValueError(f"unknown nmkit codec {self.codec!r}: pip install --upgrade nmkit")


class _Stored(nn.Module):
    """Placeholder for a compressed layer while transformers loads it.

    transformers sets the stored tensors on it one by one; once all have arrived (decoded first when
    the file is coded) it builds the real layer at once and lets the stored copies go, so loading
    holds the compressed tensors of one layer at a time beside the built ones.
    """

    def __init__(self, name: str, layer: dict, bias: bool, dtype: torch.dtype, tables: dict[str, dict],
                 release: ReleaseQueue) -> None:
        super().__init__()
        self.name, self.layer, self.dtype, self.tables, self.release = name, layer, dtype, tables, release
        self.format = LAYER_FORMATS[layer["format"]]
        self.suffixes = self.format.suffixes(layer)
        self.parts = [f"weight{s}" for s in self.suffixes] + (["bias"] if bias else [])
        self.arrived: dict[str, torch.Tensor] = {}
        self.built: nn.Module | None = None
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8))  # the guard (see module docstring)
        for part in self.parts:
            self.register_buffer(part, torch.empty(0, dtype=torch.uint8))

    def __setattr__(self, attr: str, value) -> None:
        if attr not in getattr(self, "parts", ()) or value.device.type == "meta":
            return super().__setattr__(attr, value)
        key = f"{self.name}.{attr}"
        if key in self.tables:
            blob = value.data
            value = tensor_codec.decode({key: blob}, {key: self.tables[key]})[key]
            self.release.add([blob])
        self.arrived[attr] = value.data
        if len(self.arrived) == len(self.parts):
            tensors = {s: self.arrived.pop(f"weight{s}") for s in self.suffixes}
            bias = self.arrived.pop("bias", None)
            built = self.format.build(self.layer, tensors, bias, self.dtype)
            # Not a submodule: transformers would see its parameters as never loaded and re-initialise them.
            object.__setattr__(self, "built", built)
            # The stored tensors are copied into the built layer; their file pages need not stay resident.
            self.release.add([*tensors.values(), bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # never called: replaced after loading
        raise RuntimeError("nmkit placeholder layer was not replaced after loading")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _codec_tables(checkpoint_files: list[str] | None) -> dict[str, dict]:
    tables: dict[str, dict] = {}
    for f in checkpoint_files or []:
        if str(f).endswith(".safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                tables.update(tensor_codec.table_from_metadata(fh.metadata()) or {})
    return tables


class NmkitHfQuantizer(HfQuantizer):
    """Loads nmkit exports (see the module docstring). Inference only; the loaded model cannot be re-saved."""

    requires_calibration = True  # only checkpoints written by nmkit, never quantize-on-load

    def __init__(self, quantization_config: NmkitConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self._placeholders: set[str] = set()
        self._tables: dict[str, dict] = {}
        self._release = ReleaseQueue()  # file pages of stored tensors already copied into built layers
        self._dtype = torch.float32

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise ValueError("nmkit checkpoints load onto one device; pass no device_map or a single device")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self._dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        if dtype is not None:
            self._dtype = dtype
        if self.quantization_config.codec != "none":
            self._tables = _codec_tables(checkpoint_files)
        for name, layer in self.quantization_config.layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"nmkit checkpoint names layer {name!r}, which this model does not have") from None
            _set_module(model, name, _Stored(name, layer, getattr(old, "bias", None) is not None, self._dtype,
                                             self._tables, self._release))
            self._placeholders.add(name)
        model.register_buffer(INSTALL_HINT, torch.empty(0, dtype=torch.uint8))  # expected here, so not reported
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # True lets a tensor in with a shape other than the skeleton's: the stored compressed
        # tensors of a placeholder, and every coded blob.
        return bool(self._tables) or param_name.rpartition(".")[0] in self._placeholders

    def get_new_dtype(self, converter, param, dtype):
        if self._tables:
            return None  # coded blobs are bytes until decoded
        target = (getattr(converter, "target_patterns", None) or [""])[0]
        if target.rpartition(".")[0] in self._placeholders:
            return None  # as stored (e.g. fp16 scales): the layer's builder casts what it needs
        return super().get_new_dtype(converter, param, dtype)

    def _decode(self, model: nn.Module) -> None:
        """Coded blobs -> tensors, one at a time, in the model's dtype (floats) or as stored."""
        for full, tensor in list(model.state_dict(keep_vars=True).items()):
            entry = self._tables.get(full)
            owner_name, _, attr = full.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if entry is None or isinstance(owner, _Stored):
                continue
            value = tensor_codec.decode({full: tensor.data}, {full: entry})[full]
            self._release.add([tensor.data])
            if value.is_floating_point():
                value = value.to(self._dtype)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._tables:
            self._decode(model)
        self._release.flush()
        model._buffers.pop(INSTALL_HINT, None)
        for name in sorted(self._placeholders):
            stored = model.get_submodule(name)
            if stored.built is None:
                missing = [p for p in stored.parts if p not in stored.arrived]
                raise ValueError(f"nmkit checkpoint is missing {', '.join(f'{name}.{p}' for p in missing)}")
            _set_module(model, name, stored.built)
        if hasattr(model, "tie_weights"):  # decoded embeddings are new tensors: tie the head again
            model.tie_weights()
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return False  # write nmkit files with `nmkit export`, not save_pretrained

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Add nmkit's config and quantizer to transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(NmkitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(NmkitHfQuantizer)


__all__ = ["LAYER_FORMATS", "LayerFormat", "NmkitConfig", "NmkitHfQuantizer", "register"]
