"""Quantization-aware whole-model fit: after the GPTQ sweep, train the quantized model to reproduce the
*unquantized* model's logits on the calibration windows (N:M masks fixed, codes on the grid).

The sweep rounds one layer at a time against that layer's output error, which is a weak proxy for what
a user sees (docs/quant.md: a fifth less layer error bought 2.4% perplexity). This stage optimises the
model's own output instead, as the E2E stage of EfficientQAT (Chen et al. 2024) and the whole-model fit
of the *-block pruning methods (:mod:`nmkit.oneshot.model_refit`, whose training loop it reuses) do.

Each quantized Linear's weight becomes ``keep * s * nearest(latent / s)``: a latent float weight
(started at the GPTQ result, so the first forward is exactly the swept model) rounded to the grid with
a straight-through gradient, and a learned per-row, per-group scale ``s = s0 * factor`` (rounded to fp16
in the forward, so what trains is what is stored). Norms and biases train too. The final codes are
``nearest(latent / s)`` under the fp16 scales; the teacher is the model before quantization, so the
stage closes the gap to it and cannot learn anything the unquantized model does not know.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmkit.oneshot.blocks import capture_block_inputs, find_blocks, run_block
from nmkit.oneshot.model_refit import ModelRefitResult, refit_model

# The layers are nmkit.quant.gptq.QuantizedLayer (keep, codes, scales, spec): typed Any because gptq
# calls this module, and an import back would make a cycle.
Layer = Any


class _FakeQuant(nn.Module):
    """latent (rows, cols) -> keep * s * nearest(latent / s), straight-through in the rounding."""

    def __init__(self, layer: Layer) -> None:
        super().__init__()
        self.spec = layer.spec
        rows, cols = layer.shape
        self.register_buffer("keep", layer.keep.clone())
        self.register_buffer("s0", layer.scales.float().clone())
        self.register_buffer("group_of_col", torch.arange(cols) // (64 * layer.spec.group_blocks))
        self.factor = nn.Parameter(torch.ones_like(self.s0))

    def scales(self) -> torch.Tensor:
        """(rows, groups) fp16-representable scales, straight-through in the fp16 rounding."""
        s = self.s0 * self.factor
        return s + (s.half().float() - s).detach()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        s = self.scales()[:, self.group_of_col]
        y = latent / torch.where(s > 0, s, torch.ones_like(s))
        q = y + (self.spec.nearest(y.detach()) - y).detach()
        return q * s * self.keep

    @torch.no_grad()
    def to_layer(self, latent: torch.Tensor, old: Layer) -> Layer:
        scales = (self.s0 * self.factor).half()
        s = scales.float()[:, self.group_of_col]
        codes = self.spec.nearest(latent / torch.where(s > 0, s, torch.ones_like(s)))
        rows = old.shape[0]
        codes = torch.where(s > 0, codes, torch.zeros_like(codes))[self.keep].reshape(rows, old.codes.shape[1], -1)
        return replace(old, codes=codes.to(torch.int8).contiguous(), scales=scales.contiguous())


@torch.no_grad()
def teacher_states(model: nn.Module, calibration: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The last transformer block's output on ``calibration`` (samples, seqlen): call before quantizing."""
    _, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks[0], calibration, next(model.parameters()).device)
    for block in blocks:
        hidden = run_block(block, hidden, kwargs, batch)
    return hidden


def fit_quantized(model: nn.Module, layers: dict[str, Layer], calibration: torch.Tensor,
                  teacher: torch.Tensor, epochs: int = 2, lr: float = 1e-4, batch: int = 8,
                  log=None) -> ModelRefitResult:
    """Train ``model``'s quantized layers (named in ``layers``), norms and biases so that on ``calibration``
    its last block reproduces ``teacher`` (:func:`teacher_states` of the unquantized model); ``layers`` and
    the weights are updated in place to the fitted codes and scales. Never worse on the objective than
    the sweep (the training loop rolls back). ``batch``: samples per forward when capturing inputs."""
    _, blocks = find_blocks(model)
    with torch.no_grad():  # the embeddings are not quantized: the first block's input is the teacher's too
        inputs, kwargs = capture_block_inputs(model, blocks[0], calibration, next(model.parameters()).device)
    fakes: dict[str, _FakeQuant] = {}
    for name, layer in layers.items():
        module = model.get_submodule(name)
        fakes[name] = _FakeQuant(layer).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", fakes[name])
    try:
        # the scale factors (start 1) move at the weights' rate; at 10x the fit diverged (docs/quant.md)
        fit = refit_model(model, blocks, [], inputs, teacher, kwargs, epochs=epochs, lr=lr, log=log)
        for name, fake in fakes.items():
            module = model.get_submodule(name)
            layers[name] = fake.to_layer(module.parametrizations.weight.original, layers[name])
    finally:
        for name in fakes:
            parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=False)
    with torch.no_grad():  # exactly code x scale, as stored (not the straight-through float sum)
        for name, layer in layers.items():
            weight = model.get_submodule(name).weight
            weight.copy_(layer.dequantized().to(weight.dtype))
    return fit
