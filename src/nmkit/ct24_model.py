"""Load a ``nmkit export --format compressed-tensors-24`` directory as a dense transformers model,
without the compressed-tensors package (its reader dropped sparse-24-bitmask). Beside
:mod:`nmkit.compressed_model`: :mod:`nmkit.formats` reads the tensors, this builds the model."""

from __future__ import annotations

from pathlib import Path

import torch

from nmkit.compressed_model import _no_init
from nmkit.errors import UserError
from nmkit.formats.ct24 import dense_tensors


def load_ct24(directory: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    # The block names compressed-tensors as the quantizer; the tensors are decompressed here instead.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in dense_tensors(directory).items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and "lm_head" in k)]
    if missing or unexpected:
        raise UserError(f"{directory}: checkpoint does not match the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model
