"""Quality cost of each candidate pattern per layer, from one pass of calibration data.

For every planned layer and pattern, the layer is pruned on its own by the chosen method (the
others stay dense) and its relative reconstruction error ||(W - W')X||^2 / ||WX||^2 on the
calibration inputs X is recorded (the error the sequential pipeline reports). One pass through the
dense blocks collects every X^T X, so the cost is one forward pass plus one solve per layer and pattern.
The estimated loss of a plan is the sum of its layers' errors (dense: 0). Results are cached by the
model's weights, the method and the calibration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from nmkit.errors import UserError
from nmkit.jsonout import dumps
from nmkit.models import cache_dir
from nmkit.oneshot.blocks import capture_block_inputs, find_blocks, run_block
from nmkit.oneshot.methods import METHODS, reconstruction_error
from nmkit.oneshot.sequential import weights_fingerprint
from nmkit.oneshot.stats import collect_block_stats
from nmkit.oneshot.targets import find_targets
from nmkit.patterns import NM
from nmkit.plan.cost import DENSE


def cache_key(model: nn.Module, method: str, samples: torch.Tensor, patterns: tuple[str, ...]) -> str:
    text = (f"{weights_fingerprint(model)}|{method}|{tuple(samples.shape)}|{int(samples.long().sum())}|"
            f"{','.join(patterns)}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(key: str) -> Path:
    return cache_dir() / "plan" / f"sensitivity-{key}.json"


@torch.no_grad()
def measure(model: nn.Module, samples: torch.Tensor, method: str, patterns: tuple[str, ...],
            batch: int = 8, log=lambda msg: None) -> dict[str, dict[str, float]]:
    """layer name -> pattern -> relative reconstruction error (dense is 0)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    if not METHODS[method].calibrated:
        raise UserError(f"sensitivity needs a calibrated method (e.g. wanda, sparsegpt), not {method!r}")
    device = next(model.parameters()).device
    targets = find_targets(model)
    prefix, blocks = find_blocks(model)
    head = f"{prefix}." if prefix else ""
    hidden, kwargs = capture_block_inputs(model, blocks[0], samples, device)
    errors: dict[str, dict[str, float]] = {}
    for i, block in enumerate(blocks):
        mine = [t for t in targets if t.name.startswith(f"{head}{i}.")]
        if mine:
            block_stats = collect_block_stats(block, mine, hidden, kwargs, batch)
            for t in mine:
                w = t.weight.detach()
                w = (w.T if t.reduce_dim == 0 else w).float()
                stats = block_stats[t.name]
                errors[t.name] = {DENSE: 0.0}
                for p in patterns:
                    if p == DENSE or w.shape[1] % NM.parse(p).group:
                        continue
                    pruned = METHODS[method].solve(w.clone(), stats, NM.parse(p))
                    errors[t.name][p] = reconstruction_error(w, pruned, stats)
        log(f"sensitivity: block {i + 1}/{len(blocks)}")
        hidden = run_block(block, hidden, kwargs, batch)  # the dense block: each layer is judged alone
    return errors


def cached(model: nn.Module, samples: torch.Tensor, method: str, patterns: tuple[str, ...],
           log=lambda msg: None) -> dict[str, dict[str, float]]:
    """:func:`measure`, read from the cache when the same weights, method and calibration were measured."""
    path = cache_path(cache_key(model, method, samples, patterns))
    if path.is_file():
        try:
            log(f"sensitivities from cache ({path})")
            return json.loads(path.read_text())
        except ValueError:
            pass
    errors = measure(model, samples, method, patterns, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(errors, indent=1) + "\n")
    tmp.replace(path)
    return errors
