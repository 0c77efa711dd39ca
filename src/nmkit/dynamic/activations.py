"""Dynamic N:M activation sparsity: prune the *input* of chosen Linear layers at run time.

Each token's input vector keeps the N largest-magnitude entries in every group of M features
(the GEMM's reduction dimension, the same grouping weights use), so ``x W^T`` can run as an N:M
product with the sparse operand on the activation side. The usual target is the FFN's second
projection, whose input (the gated or ReLU-like hidden state) is already heavy-tailed.

Applied with forward pre-hooks, which :meth:`NMActivations.remove` takes off again; the modules
themselves are not changed. This is the accuracy reference: the pruned input is still a dense
tensor, so on its own it saves no time.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.selection import matches
from nmkit.solvers.nm import nm_mask


def prune_activations(x: torch.Tensor, pattern: NM | str = "2:4") -> torch.Tensor:
    """``x`` with all but the N largest-magnitude entries of every M consecutive features zeroed.

    Features run along the last dim, which must be a multiple of M. Gradients flow through the
    kept entries (the mask itself is not differentiated).
    """
    pattern = NM.parse(pattern)
    if x.shape[-1] % pattern.group:
        raise UserError(f"activation width {x.shape[-1]} is not a multiple of M={pattern.group}; "
                        "choose a pattern whose M divides it")
    with torch.no_grad():
        keep = nm_mask(x.detach().abs(), pattern, dim=-1)
    return x * keep


def ffn_down_projections(model: torch.nn.Module) -> list[str]:
    """Names of the Linear layers that read an FFN's hidden state: in_features equals the model's
    ``intermediate_size`` (Llama's ``down_proj``, BERT's ``output.dense``, ...)."""
    config = getattr(model, "config", None)
    width = getattr(config, "intermediate_size", None)
    if width is None:
        raise UserError("the model has no config.intermediate_size to find its FFN projections by; "
                        "pass the layer names (or globs) with targets=")
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features == width]


class NMActivations:
    """Prune the input of every Linear layer named by ``targets`` (names or globs; default: the FFN
    down-projections) to ``pattern`` on every forward pass, until :meth:`remove`.

        with NMActivations(model, "2:4"):
            ppl = perplexity(model, ...)
    """

    def __init__(self, model: torch.nn.Module, pattern: NM | str = "2:4", targets: Iterable[str] | None = None):
        self.pattern = NM.parse(pattern)
        names = ffn_down_projections(model) if targets is None else _match(model, list(targets))
        if not names:
            raise UserError("no Linear layer matched; check targets= against model.named_modules()")
        modules = dict(model.named_modules())
        for name in names:
            width = modules[name].in_features
            if width % self.pattern.group:
                raise UserError(f"{name} reads {width} features, not a multiple of M={self.pattern.group}")
        self.names = names
        self._handles = [modules[n].register_forward_pre_hook(self._hook) for n in names]

    def _hook(self, module: torch.nn.Module, args: tuple) -> tuple:
        return (prune_activations(args[0], self.pattern), *args[1:])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> NMActivations:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _match(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [n for n in linear if matches(n, patterns)]
