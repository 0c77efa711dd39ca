"""Which layers a one-shot prune touches, and along which weight dimension their groups run."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from nmkit.errors import UserError
from nmkit.selection import selected

# A layer is "inside the transformer blocks" when its qualified name has a numeric component
# (model.layers.3.mlp.up_proj, encoder.layer.0..., transformer.h.11...). That leaves out
# embeddings, the LM head and poolers without knowing each architecture.
_BLOCK_RE = re.compile(r"(^|\.)\d+\.")


@dataclass(frozen=True)
class Target:
    name: str
    module: nn.Module
    # Weight dim that is the GEMM reduction (input) dim: 1 for nn.Linear (out, in), 0 for HF Conv1D (in, out).
    reduce_dim: int

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def _reduce_dim(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style Conv1D
        return 0
    return None


def find_targets(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[Target]:
    """Linear (and HF Conv1D) layers to prune, in module order.

    Default: every such layer inside the repeated transformer blocks. ``include`` replaces that
    default with glob patterns over qualified names (``"*mlp*"``, ``"model.layers.0.*"``);
    ``exclude`` globs are removed afterwards.
    """
    targets = []
    for name, module in model.named_modules():
        dim = _reduce_dim(module)
        if dim is None:
            continue
        if selected(name, include or None, exclude, default=bool(_BLOCK_RE.search(name))):
            targets.append(Target(name, module, dim))
    if not targets:
        raise UserError(
            "no layers selected for pruning"
            + (f" (include={include}, exclude={exclude})" if include or exclude else "")
            + "; check --include/--exclude glob patterns against the model's module names"
        )
    return targets


def check_prunable(model: nn.Module, targets: list[Target]) -> None:
    """Refuse, naming the layer, weights that are not finite and weights shared with a layer not pruned.

    A NaN or Inf survives pruning (magnitude keeps an Inf) and poisons everything after it. A tied weight
    (``lm_head`` sharing the embedding's) would be pruned under the other name too, silently.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    pruned = {f"{t.name}.weight" for t in targets}
    for t in targets:
        bad = int((~torch.isfinite(t.weight.detach())).sum())
        if bad:
            raise UserError(f"layer {t.name} has {bad} non-finite weights (NaN or Inf): the model is damaged or "
                            "diverged; nmkit does not prune it. Fix or re-download the weights (or --exclude the "
                            "layer)")
        shared = [n for n in names.get(id(t.weight), []) if n not in pruned]
        if shared:
            raise UserError(f"layer {t.name} shares its weight with {', '.join(shared)} (tied weights): pruning it "
                            f"would prune that too and the output would not match its sidecar; exclude it "
                            f"(--exclude {t.name}) or untie the weights first")
