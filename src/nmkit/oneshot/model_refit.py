"""Whole-model reconstruction: after every block is pruned (and fitted), fit all kept weights together so
that the pruned model's output matches the *dense* model's on the calibration windows (masks fixed).

Block fits (:mod:`nmkit.oneshot.block_refit`) each see one block; the error they leave compounds through
the depth (the last blocks of SmolLM2 end with ten times the first blocks' output error). This stage
trains every block at once on

    KL( softmax(head(y_dense)) || softmax(head(block_L(...block_1(x)))) )   for a language model,
    mean || block_L(...block_1(x)) - y_dense ||^2                          otherwise,

where ``x`` is the embedding output (pruning does not touch it) and ``y_dense`` the dense model's last block
output, which the sequential pipeline already carries. So no teacher model is held: the teacher's logits
are its final hidden states through the (frozen) final norm and LM head. It is the distillation stage of
ELSA / EBFT-style whole-model objectives, on the calibration set only. The block parameters train (Adam,
warm-up then cosine); every pruned weight is masked after each step, so patterns are exactly what the
layer solves chose.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nmkit.oneshot.targets import Target


@dataclass(frozen=True)
class ModelRefitResult:
    loss_before: float  # the objective on the check windows, before and after
    loss_after: float
    steps: int
    objective: str  # "kl" (logits through the final norm and head) or "mse" (last hidden state)


def progress_line(message: str) -> None:
    """A fit's progress line on stderr, above any progress bar (stdout may carry --json)."""
    tqdm.write(message, file=sys.stderr)


def logit_head(model: nn.Module):
    """``h -> logits`` through the model's final norm and LM head, or None when it has no such head."""
    base = getattr(model, "base_model", None)
    norm = getattr(base, "norm", None) if base is not model else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or out is None:
        return None
    return lambda h: out(norm(h))


def _run(blocks: list[nn.Module], hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    for block in blocks:
        out = block(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _loss(student: torch.Tensor, teacher: torch.Tensor, head) -> torch.Tensor:
    if head is None:
        return ((student - teacher) ** 2).mean()
    log_s = F.log_softmax(head(student).float(), dim=-1)
    log_t = F.log_softmax(head(teacher).float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean()


def _objective(blocks, inputs, target, kwargs, head, batch) -> float:
    total = 0.0
    with torch.no_grad():
        for s in range(0, inputs.shape[0], batch):
            part = inputs[s : s + batch]
            total += float(_loss(_run(blocks, part, kwargs), target[s : s + batch], head)) * part.shape[0]
    return total / inputs.shape[0]


def refit_model(model: nn.Module, blocks: list[nn.Module], targets: list[Target], inputs: torch.Tensor,
                target: torch.Tensor, kwargs: dict, epochs: int = 2, lr: float = 1e-4, batch: int = 2,
                warmup: int = 4, seed: int = 0, log=None, check_windows: int = 16) -> ModelRefitResult:
    """Adam on the block parameters (pruned weights masked) so ``blocks`` map ``inputs`` (the first block's
    input, K x L x H) to ``target`` (the dense last block's output). Deterministic for a fixed seed and thread
    count. Never hands back a model worse on the objective than it was given, measured on the first
    ``check_windows`` windows (a forward pass over all of them costs a third of an epoch).
    """
    head = logit_head(model)
    params = [p for b in blocks for p in b.parameters() if p.requires_grad]
    pruned = {id(t.weight): t.weight.detach() == 0 for t in targets}
    start = [p.detach().clone() for p in params]
    check = slice(0, min(check_windows, inputs.shape[0]))
    before = _objective(blocks, inputs[check], target[check], kwargs, head, batch)
    trained = {id(p) for p in params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
    for p in others:  # embeddings, final norm, head: frozen
        p.requires_grad_(False)
    order = torch.Generator().manual_seed(seed)
    batches = [idx for _ in range(epochs) for idx in torch.randperm(inputs.shape[0], generator=order).split(batch)]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    try:
        with torch.enable_grad():
            for step, idx in enumerate(batches):
                frac = (step - warmup) / max(1, len(batches) - warmup)
                rate = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * frac))
                for group in optimizer.param_groups:
                    group["lr"] = rate
                loss = _loss(_run(blocks, inputs[idx], kwargs), target[idx], head)
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                for p in params:
                    if id(p) in pruned:
                        p.grad.masked_fill_(pruned[id(p)], 0.0)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                with torch.no_grad():
                    for p in params:
                        if id(p) in pruned:
                            p.masked_fill_(pruned[id(p)], 0.0)  # exact +0.0 off the mask
                if log and (step % 8 == 0 or step + 1 == len(batches)):
                    log(f"model fit step {step + 1}/{len(batches)} loss {loss.item():.4f}")
    finally:
        for p in params:
            p.grad = None
        for p in others:
            p.requires_grad_(True)
    after = _objective(blocks, inputs[check], target[check], kwargs, head, batch)
    if not after <= before:  # diverged or no gain: keep what the block fits left
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        after = before
    return ModelRefitResult(before, after, len(batches), "mse" if head is None else "kl")
