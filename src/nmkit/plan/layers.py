"""The layers a plan covers: the Linear layers inside the transformer blocks, and the LM head."""

from __future__ import annotations

import hashlib

from torch import nn

from nmkit.errors import UserError
from nmkit.oneshot.targets import find_targets
from nmkit.plan.cost import ModelShape


def model_shape(model: nn.Module) -> ModelShape:
    """Planned layers (name -> (out, in)), the head's shape and an architecture key for caches."""
    layers = {}
    for t in find_targets(model):
        w = t.weight
        layers[t.name] = tuple(w.shape) if t.reduce_dim == 1 else tuple(w.shape[::-1])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UserError(f"{type(model).__name__} has no LM head; `nmkit plan` plans causal language models")
    cfg = getattr(model, "config", None)
    text = f"{getattr(cfg, 'model_type', type(model).__name__)}|{sorted(layers.items())}|{tuple(head.weight.shape)}"
    return ModelShape(layers, tuple(head.weight.shape), hashlib.sha256(text.encode()).hexdigest()[:16])
