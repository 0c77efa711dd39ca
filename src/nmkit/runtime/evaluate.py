"""Perplexity through the runtime itself, so quantized kinds are scored with the arithmetic they run with
(INT8 activations, fp16 scales), under the same pinned protocol as :mod:`nmkit.evaluate`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nmkit.data import tokenize
from nmkit.evaluate import Perplexity, eval_windows, protocol_for
from nmkit.runtime.engine import Engine

_CHUNK = 512  # tokens per forward call: bounds the logits buffer (chunk x vocab floats)


def window_nll(engine: Engine, window: torch.Tensor) -> float:
    """Summed next-token NLL over one window (its first token is context only)."""
    engine.reset()
    total = 0.0
    ids = window.tolist()
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        logits = engine.forward(chunk, all_logits=True)
        targets = torch.tensor(ids[start + 1 : start + len(chunk) + 1])
        total += F.cross_entropy(logits[: len(targets)], targets, reduction="sum").item()
    return total


def perplexity(engine: Engine, tokenizer, text, seqlen: int = 2048, windows: int | None = None,
               ids: torch.Tensor | None = None, progress: bool = True) -> Perplexity:
    """:func:`nmkit.evaluate.perplexity`, computed by ``engine`` (its ``max_seq`` must cover ``seqlen``)."""
    ids = tokenize(tokenizer, text) if ids is None else ids
    batch = eval_windows(ids, seqlen, windows)
    total = sum(window_nll(engine, w) for w in tqdm(batch, desc="perplexity", unit="window", disable=not progress,
                                                     leave=False))
    nll = total / (batch.shape[0] * (seqlen - 1))
    return Perplexity(ppl=math.exp(nll) if nll < 700 else math.inf, nll=nll,
                      protocol=protocol_for(text, ids, seqlen, windows))
