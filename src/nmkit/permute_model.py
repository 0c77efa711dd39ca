"""Apply input-channel permutations to a transformer without changing what it computes.

A permutation of a Linear's input channels is free when the producing layer's output channels can
be permuted to match:

* Llama-style MLP: ``down_proj`` inputs <-> ``gate_proj`` and ``up_proj`` outputs (the gated product
  is elementwise per channel).
* Attention: ``o_proj`` inputs <-> ``v_proj`` outputs, one permutation *inside* each KV head, shared
  by all query heads of that KV group (channels cannot move between heads).

Any other Linear can take a run-time index instead (:class:`PermutedInput`: gather the input, then a
Linear with permuted columns). Call this before pruning; it returns what it changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nmkit import scores
from nmkit.patterns import NM
from nmkit.solvers.permutation import kept_by_nm, permute_channels

ScoreFn = Callable[[str, nn.Linear], torch.Tensor]


def magnitude(_: str, layer: nn.Linear) -> torch.Tensor:
    """Default importance: |W| (:func:`nmkit.scores.magnitude`), in the ``ScoreFn`` signature."""
    return scores.magnitude(layer.weight)


@dataclass
class LayerChange:
    name: str
    kind: str  # "absorbed" (producer permuted too) or "runtime" (PermutedInput wrapper)
    kept_default: float
    kept: float
    perm: torch.Tensor | None = field(default=None, repr=False)  # the consumer's input permutation

    @property
    def gain(self) -> float:
        return self.kept / self.kept_default - 1.0 if self.kept_default else 0.0


@dataclass
class PermutationReport:
    pattern: str
    changes: list[LayerChange] = field(default_factory=list)

    def summary(self) -> dict:
        tot_d = sum(c.kept_default for c in self.changes)
        tot = sum(c.kept for c in self.changes)
        return {"pattern": self.pattern, "layers": len(self.changes), "kept_gain": tot / tot_d - 1 if tot_d else 0}


class PermutedInput(nn.Module):
    """``inner(x[..., perm])``: a run-time index for layers whose producer cannot absorb ``perm``."""

    def __init__(self, inner: nn.Linear, perm: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", perm.clone())

    @property
    def weight(self) -> torch.Tensor:  # so pruning code that looks for .weight still finds it
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.perm))


@torch.no_grad()
def _permute_rows(layer: nn.Linear, perm: torch.Tensor) -> None:
    layer.weight.copy_(layer.weight[perm])
    if layer.bias is not None:
        layer.bias.copy_(layer.bias[perm])


@torch.no_grad()
def _permute_cols(layer: nn.Linear, perm: torch.Tensor) -> None:
    layer.weight.copy_(layer.weight[:, perm])


def _search(scores: torch.Tensor, pattern: NM, opts: dict) -> torch.Tensor:
    return permute_channels(scores.detach().float().cpu(), pattern, **opts).perm


@torch.no_grad()
def permute_model(
    model: nn.Module,
    pattern: NM | str = "2:4",
    score_fn: ScoreFn = magnitude,
    time_budget_s: float = 1.0,
    runtime_index: bool = False,
    seed: int = 0,
    max_escapes: int | None = None,
    method: str = "auto",
    consumers: Callable[[str], bool] | None = None,
) -> PermutationReport:
    """Permute input channels of the model's Linears so N:M keeps more score; outputs unchanged.

    Handles modules with ``gate_proj``/``up_proj``/``down_proj`` (MLP) and ``v_proj``/``o_proj`` plus
    ``num_heads``/``num_key_value_heads``/``head_dim`` on the module or its ``config`` (attention).
    ``runtime_index=True`` also wraps every other Linear (except ``lm_head``) in :class:`PermutedInput`.
    ``method``, ``time_budget_s`` and ``max_escapes`` go to ``permute_channels`` for each matrix.
    ``consumers`` (qualified name -> bool) limits which ``down_proj``/``o_proj`` layers are permuted.
    """
    p = NM.parse(pattern)
    opts = {"method": method, "time_budget_s": time_budget_s, "seed": seed, "max_escapes": max_escapes}
    report = PermutationReport(str(p))
    handled: set[str] = set()
    names = {id(m): n for n, m in model.named_modules()}
    cfg = getattr(model, "config", None)
    for name, mod in list(model.named_modules()):
        if all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")):
            down = mod.down_proj
            if down.weight.shape[1] % p.group or (consumers and not consumers(names[id(down)])):
                continue
            scores = score_fn(f"{name}.down_proj", down)
            before = kept_by_nm(scores, p)
            perm = _search(scores, p, opts).to(down.weight.device)
            _permute_cols(down, perm)
            _permute_rows(mod.gate_proj, perm)
            _permute_rows(mod.up_proj, perm)
            after = kept_by_nm(score_fn(f"{name}.down_proj", down), p)
            report.changes.append(LayerChange(names[id(down)], "absorbed", before, after, perm.cpu()))
            handled.update({names[id(down)], names[id(mod.gate_proj)], names[id(mod.up_proj)]})
        elif hasattr(mod, "v_proj") and hasattr(mod, "o_proj"):
            if consumers and not consumers(names[id(mod.o_proj)]):
                continue
            mcfg = getattr(mod, "config", None) or cfg  # a block passed alone has no model config
            heads = getattr(mod, "num_heads", None) or getattr(mcfg, "num_attention_heads", None)
            kv = getattr(mod, "num_key_value_heads", None) or getattr(mcfg, "num_key_value_heads", None) or heads
            d = getattr(mod, "head_dim", None) or mod.o_proj.weight.shape[1] // heads
            if heads is None or d % p.group:
                continue
            o = mod.o_proj
            scores = score_fn(f"{name}.o_proj", o)
            before = kept_by_nm(scores, p)
            per_group = heads // kv
            full = torch.arange(o.weight.shape[1])
            v_perm = torch.arange(mod.v_proj.weight.shape[0])
            for g in range(kv):
                q_heads = range(g * per_group, (g + 1) * per_group)
                stacked = torch.cat([scores[:, h * d : (h + 1) * d] for h in q_heads], dim=0)
                local = _search(stacked, p, opts)
                v_perm[g * d : (g + 1) * d] = g * d + local
                for h in q_heads:
                    full[h * d : (h + 1) * d] = h * d + local
            _permute_cols(o, full.to(o.weight.device))
            _permute_rows(mod.v_proj, v_perm.to(o.weight.device))
            after = kept_by_nm(score_fn(f"{name}.o_proj", o), p)
            report.changes.append(LayerChange(names[id(o)], "absorbed", before, after, full.clone()))
            handled.update({names[id(o)], names[id(mod.v_proj)]})
    if runtime_index:
        for name, mod in list(model.named_modules()):
            for child_name, child in list(mod.named_children()):
                full_name = f"{name}.{child_name}" if name else child_name
                if not isinstance(child, nn.Linear) or full_name in handled or child_name == "lm_head":
                    continue
                if child.weight.shape[1] % p.group:
                    continue
                scores = score_fn(full_name, child)
                before = kept_by_nm(scores, p)
                perm = _search(scores, p, opts).to(child.weight.device)
                _permute_cols(child, perm)
                setattr(mod, child_name, PermutedInput(child, perm))
                after = kept_by_nm(score_fn(full_name, child), p)
                report.changes.append(LayerChange(full_name, "runtime", before, after, perm.cpu()))
    return report
