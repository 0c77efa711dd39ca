"""One context for every kind of run-time N:M a command can ask for."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from nmkit.dynamic.activations import NMActivations
from nmkit.dynamic.attention import NMAttention
from nmkit.patterns import NM


def runtime_sparsity(
    model: torch.nn.Module,
    attention: NM | str | None = None,
    layers: Iterable[int] | None = None,
    activations: NM | str | None = None,
) -> contextlib.ExitStack:
    """N:M attention (limited to ``layers`` when given) and/or N:M FFN inputs on ``model`` until the
    returned context exits; with neither, a context that changes nothing."""
    stack = contextlib.ExitStack()
    if attention is not None:
        stack.enter_context(NMAttention(model, attention, layers))
    if activations is not None:
        stack.enter_context(NMActivations(model, activations))
    return stack
