"""Recovery fine-tuning of a one-shot-pruned causal LM with its mask fixed (optionally distilling a dense teacher).

The mask is the model's current zero pattern: ``SparseTraining(method="fixed", masks="nonzero")``
masks the gradients, so pruned weights stay exactly zero; with ``lora_rank > 0`` only masked LoRA
adapters train and are merged at the end (also exactly N:M).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nmkit.errors import TrainingDiverged
from nmkit.patterns import NM
from nmkit.training.core import SparseTraining
from nmkit.training.lora import add_sparse_lora, merge_sparse_lora


@dataclass
class RecoveryConfig:
    steps: int
    lr: float = 5e-5
    warmup: int = 10
    weight_decay: float = 0.0
    kd_weight: float = 0.5  # loss = (1 - w) * CE + w * KL(teacher || student), with a teacher only
    temperature: float = 1.0
    clip: float = 1.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    max_seconds: float | None = None


@dataclass
class RecoveryResult:
    steps_done: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    finalize: dict = field(default_factory=dict)


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean() * t * t


def _lr_at(step: int, elapsed: float, cfg: RecoveryConfig) -> float:
    """Warm-up, then cosine over whichever runs out first: the steps or the time budget."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.max_seconds:
        frac = max(frac, elapsed / cfg.max_seconds)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def recovery_finetune(
    model: nn.Module,
    layers: list[str],
    pattern: NM | str | None,
    batches: torch.Tensor,
    cfg: RecoveryConfig,
    teacher: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
) -> RecoveryResult:
    """Fine-tune ``model`` (HF causal LM) on ``batches`` (steps, batch, seqlen) keeping every zero of ``layers``.

    Embeddings and the LM head stay frozen (they are dense and tied in small LMs). With no
    ``layers`` (``pattern`` None) the model is dense and every other weight trains freely, e.g. to
    adapt it to run-time N:M attention. Returns per-step losses and the finalize report (N:M
    validity of every layer).
    """
    pattern = None if pattern is None else NM.parse(pattern)
    if layers and pattern is None:
        raise ValueError("pruned layers need their N:M pattern")
    model.train()
    for name, p in model.named_parameters():
        if "embed" in name or "lm_head" in name:
            p.requires_grad_(False)
    if cfg.lora_rank > 0:
        add_sparse_lora(model, cfg.lora_rank, cfg.lora_alpha, include=layers)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        sparse = None
    elif layers:
        sparse = SparseTraining(model, pattern, method="fixed", masks="nonzero", include=layers, exclude=())
    else:
        sparse = None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    result = RecoveryResult(0, 0.0)
    t0 = time.perf_counter()
    for step in range(min(cfg.steps, batches.shape[0])):
        # Stop when the budget is spent or one more step (at the mean pace) would overrun it.
        elapsed = time.perf_counter() - t0
        pace = elapsed / step if step else 0.0
        if cfg.max_seconds is not None and elapsed + pace > cfg.max_seconds:
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, time.perf_counter() - t0, cfg)
        ids = batches[step]
        logits = model(ids).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(ids).logits[:, :-1]
            loss = (1 - cfg.kd_weight) * ce + cfg.kd_weight * _kd_loss(logits, t_logits, cfg.temperature)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"fine-tuning diverged at step {step + 1}: the loss is {loss.item()} "
                                   f"(learning rate {cfg.lr:g}); lower the learning rate (--lr)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sparse is not None:
            sparse.step(loss.item())
        result.losses.append(round(loss.item(), 5))
        result.steps_done = step + 1
        if log and (step % 10 == 0 or step + 1 == cfg.steps):
            log(
                f"finetune step {step + 1}/{cfg.steps} loss {loss.item():.4f} ce {ce.item():.4f} "
                f"({time.perf_counter() - t0:.0f}s)"
            )
    result.seconds = time.perf_counter() - t0
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(f"fine-tuning diverged: {bad[0]} (and {len(bad) - 1} more) hold NaN or Inf after "
                               f"{result.steps_done} steps (learning rate {cfg.lr:g}); lower the learning rate (--lr)")
    if sparse is not None:
        result.finalize = sparse.finalize()
    elif not layers:
        result.finalize = {"valid": True, "layers": {}}
    else:
        merge_sparse_lora(model)
        result.finalize = {"valid": all(pattern.is_valid(dict(model.named_modules())[n].weight) for n in layers)}
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return result
