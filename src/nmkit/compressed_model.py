"""Build a transformers model from a pruned directory with its pruned layers as :class:`SparseLinear`.

The model-loading layer (beside :mod:`nmkit.models`): :mod:`nmkit.formats` only reads and writes
tensors and files; this module turns them into modules.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from nmkit.errors import UserError
from nmkit.formats.io import read_stored
from nmkit.formats.nm import NMTensor, compress
from nmkit.nn import SparseLinear
from nmkit.patterns import NM
from nmkit.sidecar import STORAGE_NMKIT


def _no_init():
    """transformers' own context that skips weight initialisation (its module path moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def dense_model(directory: str | Path, config, tensors: dict[str, torch.Tensor],
                dtype: torch.dtype) -> torch.nn.Module:
    """A transformers causal LM built from ``config`` and filled with dense ``tensors`` (tied LM head
    allowed to be missing); a mismatch is one line naming ``directory``."""
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):  # nmkit's block is for from_pretrained; the tensors are dense here
        del config.quantization_config
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and "lm_head" in k)]
    if missing or unexpected:
        raise UserError(f"{directory}: checkpoint does not match the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model


def load_compressed(directory: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load an ``nmkit``-format directory as a transformers model whose pruned layers are SparseLinear.

    A dense pruned directory loads too (its pruned layers are compressed on load).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tensors, sidecar = read_stored(directory)
    compressed = sidecar.get("storage") == STORAGE_NMKIT
    if dtype is None:
        dtype = next(v.dtype for k, v in tensors.items() if v.is_floating_point())
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):  # the export's nmkit block is for from_pretrained; built here
        del config.quantization_config
    with _no_init():  # every weight is overwritten below; random init was a quarter of the load time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    for name, layer in sidecar["layers"].items():
        old = model.get_submodule(name)
        pattern = NM.parse(layer["pattern"])
        mod = SparseLinear(old.in_features, old.out_features, pattern, bias=old.bias is not None, dtype=dtype)
        if compressed:
            t = NMTensor(values=tensors.pop(f"{name}.weight_values").to(dtype),
                         mask=tensors.pop(f"{name}.weight_mask"), shape=tuple(layer["shape"]), pattern=pattern)
            t.validate()
        else:
            t = compress(tensors.pop(f"{name}.weight").to(dtype), pattern)
        mod.load_compressed(t)
        if old.bias is not None:
            mod.bias.data.copy_(tensors[f"{name}.bias"])  # left in: load_state_dict below counts it as loaded
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mod)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not k.endswith((".values", ".mask")) and not (tied and "lm_head" in k)]
    if missing or unexpected:
        raise UserError(f"{directory}: checkpoint does not match the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model
