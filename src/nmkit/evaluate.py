"""Perplexity with a pinned protocol, so numbers compare across runs and machines.

Protocol (SparseGPT/Wanda style): the split's text (for WikiText-2 test, rows joined with
``"\\n\\n"``) is tokenised once, cut into non-overlapping windows of ``seqlen`` tokens, the first
``windows`` of them are scored (all by default), and perplexity is exp of the mean token NLL.
Everything that defines the number goes into :attr:`Perplexity.protocol`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nmkit.data import Text, tokenize
from nmkit.errors import UserError
from nmkit.models import cache_dir


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    protocol: dict


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seqlen`` tokens, shape (windows, seqlen)."""
    available = ids.numel() // seqlen
    if seqlen < 2:
        raise UserError(f"--eval-seqlen must be at least 2, got {seqlen}")
    if available == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of --eval-seqlen {seqlen}")
    if windows is not None and windows < 1:
        raise UserError(f"--eval-windows must be at least 1, got {windows}")
    count = available if windows is None else min(windows, available)
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.inference_mode()
def perplexity_of_windows(model: torch.nn.Module, windows: torch.Tensor, progress: bool = True) -> float:
    """Mean next-token NLL of a causal LM over each window (the first token of a window is context only)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress, leave=False):
        ids = window.unsqueeze(0).to(device)
        logits = model(ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: Text,
    seqlen: int = 2048,
    windows: int | None = None,
    ids: torch.Tensor | None = None,
    progress: bool = True,
) -> Perplexity:
    """Perplexity of ``model`` on ``text`` under the pinned protocol. Pass ``ids`` to reuse a tokenisation."""
    ids = tokenize(tokenizer, text) if ids is None else ids
    batch = eval_windows(ids, seqlen, windows)
    nll = perplexity_of_windows(model, batch, progress=progress)
    return Perplexity(ppl=ppl_of(nll), nll=nll, protocol=protocol_for(text, ids, seqlen, windows))


def ppl_of(nll: float) -> float:
    """exp(``nll``), infinite where it overflows a float (mean NLL above ~709.78 nats)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def protocol_for(text: Text, ids: torch.Tensor, seqlen: int, windows: int | None) -> dict:
    """Everything that defines a perplexity number under the pinned protocol."""
    batch = eval_windows(ids, seqlen, windows)
    return {**text.info, "seqlen": seqlen, "windows": batch.shape[0], "tokens": batch.numel(),
            "text_tokens": ids.numel()}


@dataclass(frozen=True)
class EmbeddingFidelity:
    embeddings: torch.Tensor  # (sentences, hidden), L2-normalised
    cosine_mean: float | None  # vs the reference embeddings, when given
    cosine_min: float | None
    protocol: dict


def evaluation_sentences(text: Text, count: int = 64, min_chars: int = 40) -> list[str]:
    """A fixed, reproducible set of sentences: the first ``count`` lines of at least ``min_chars``."""
    lines = [line.strip() for line in text.text.splitlines()]
    chosen = [line for line in lines if len(line) >= min_chars and not line.startswith("=")][:count]
    if not chosen:
        raise UserError(f"no lines of at least {min_chars} characters in {text.source}")
    return chosen


@torch.inference_mode()
def embedding_fidelity(
    model: torch.nn.Module, tokenizer, text: Text, reference: EmbeddingFidelity | None = None,
    count: int = 64, max_tokens: int = 128,
) -> EmbeddingFidelity:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers style) and, given a
    reference (the dense model's result), their cosine similarity to it."""
    sentences = evaluation_sentences(text, count)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)
    cos = None if reference is None else (emb * reference.embeddings).sum(-1)
    protocol = {**text.info, "sentences": len(sentences), "max_tokens": max_tokens, "metric": "embedding cosine"}
    return EmbeddingFidelity(
        emb, None if cos is None else cos.mean().item(), None if cos is None else cos.min().item(), protocol
    )


def _fingerprint(model_dir: str) -> list | None:
    """Size and mtime of a local model's weight files; None for hub ids (not cached then)."""
    from pathlib import Path

    root = Path(model_dir)
    if not root.is_dir():
        return None
    files = sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files] or None


class DensePerplexityCache:
    """Remembers dense perplexities by (model weights, protocol) under ``$NMKIT_CACHE/perplexity.json``,
    so repeated prunes of one model don't re-evaluate the same dense model."""

    def __init__(self, path=None):
        import os
        from pathlib import Path


        self.path = Path(path) if path else cache_dir() / "perplexity.json"
        self.enabled = os.environ.get("NMKIT_NO_PPL_CACHE") is None

    def key(self, model_dir: str, protocol: dict) -> str | None:
        import json

        fingerprint = _fingerprint(model_dir)
        if fingerprint is None:
            return None
        return json.dumps({"model": fingerprint, "dir": str(model_dir), "torch": torch.__version__,
                           **{k: protocol[k] for k in ("sha256", "split", "seqlen", "windows", "tokens")}},
                          sort_keys=True)

    def get(self, key: str | None) -> float | None:
        import json

        if not (self.enabled and key and self.path.is_file()):
            return None
        return json.loads(self.path.read_text()).get(key)

    def put(self, key: str | None, ppl: float) -> None:
        import json
        import os

        if not (self.enabled and key):
            return
        table = json.loads(self.path.read_text()) if self.path.is_file() else {}
        table[key] = ppl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, self.path)
