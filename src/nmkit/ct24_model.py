"""Load a ``nmkit export --format compressed-tensors-24`` directory as a dense transformers model,
without the compressed-tensors package (its reader dropped sparse-24-bitmask). Beside
:mod:`nmkit.compressed_model`: :mod:`nmkit.formats` reads the tensors, this builds the model."""

from __future__ import annotations

from pathlib import Path

import torch

from nmkit.compressed_model import dense_model
from nmkit.formats.ct24 import dense_tensors


def load_ct24(directory: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    # The block names compressed-tensors as the quantizer; the tensors are decompressed here instead.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in dense_tensors(directory).items()}
    return dense_model(directory, config, tensors, dtype)
