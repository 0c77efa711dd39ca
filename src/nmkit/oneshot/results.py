"""What a one-shot prune returns: per-layer results and their summary (shared by both pruning loops)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LayerResult:
    name: str
    shape: list[int]
    pattern: str
    sparsity: float
    valid: bool
    rel_error: float | None = None  # ||(W - W')X||^2 / ||WX||^2 on calibration data, when measured


@dataclass
class PruneResult:
    pattern: str
    method: str
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    permutations: list = field(default_factory=list)  # PermutationChange per permuted layer (--permute)
    blocks: list[dict] = field(default_factory=list)  # block-output error before/after a block refit
    model_refit: dict | None = None  # the whole-model fit's objective before/after (model_epochs > 0)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers (weighted by size)."""
        total = sum(torch.Size(layer.shape).numel() for layer in self.layers)
        zeros = sum(layer.sparsity * torch.Size(layer.shape).numel() for layer in self.layers)
        return zeros / max(total, 1)

    @property
    def all_valid(self) -> bool:
        return all(layer.valid for layer in self.layers)

    def to_dict(self) -> dict:
        out = {"pattern": self.pattern, "method": self.method, "layers": [asdict(x) for x in self.layers]}
        out |= {"blocks": self.blocks} if self.blocks else {}
        return out | ({"model_refit": self.model_refit} if self.model_refit else {})
