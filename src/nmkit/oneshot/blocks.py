"""Run a model one transformer block at a time: find the blocks, capture their inputs, call them."""

from __future__ import annotations

import torch
from torch import nn

from nmkit.errors import UserError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the ModuleList holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise UserError(f"{type(model).__name__} has no list of transformer blocks; calibrated methods need one")
    return best[1], best[2]


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first block needs to run."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, samples: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, dict]:
    """Hidden states entering the first block for each sample (K, L, H), and the keyword arguments
    the model passes to every block (masks, rotary embeddings), captured from the first sample."""
    store: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        store.setdefault("hidden", []).append(hidden.detach())
        if "kwargs" not in store:
            kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values",
                                                                  "past_key_value", "use_cache")}
            store["kwargs"] = kept
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in samples:
            try:
                model(sample.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(store["hidden"]), store["kwargs"]


@torch.no_grad()
def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int = 8) -> torch.Tensor:
    """The block's output for every sample, computed ``batch`` samples at a time."""
    outs = []
    for start in range(0, hidden.shape[0], batch):
        out = block(hidden[start : start + batch], **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)
