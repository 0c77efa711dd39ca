"""Token generation on an :class:`~nmkit.runtime.engine.Engine`: greedy or sampled, streamed.

:func:`generate` yields token ids one at a time as they are decoded, so a caller can stream text;
:func:`complete` collects them. The prompt runs as one prefill call, then one engine call per token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from nmkit.errors import UserError
from nmkit.runtime.engine import Engine


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 means greedy (the default, reproducible); else softmax sampling with
    ``top_p`` nucleus filtering and ``seed`` for a reproducible stream."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def _pick(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_p, 0) - sorted_p >= sampling.top_p  # keep the smallest set reaching top_p
        sorted_p[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(engine: Engine, prompt: Sequence[int], max_new_tokens: int, *, sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids after ``prompt`` (the engine starts a new sequence).
    Stops early after yielding a token in ``stop_ids`` (e.g. the tokenizer's end of sequence)."""
    if len(prompt) == 0:
        raise UserError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > engine.max_seq:
        raise UserError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed the engine's "
                        f"context of {engine.max_seq} tokens; shorten them or raise --max-seq")
    gen = None
    if sampling.temperature > 0 and sampling.seed is not None:
        gen = torch.Generator().manual_seed(sampling.seed)
    stops = set(stop_ids)
    engine.reset()
    if max_new_tokens == 0:
        return
    token = _pick(engine.forward(list(prompt)), sampling, gen)
    for i in range(max_new_tokens):
        yield token
        if token in stops or i == max_new_tokens - 1:
            return
        if sampling.temperature == 0:
            token = engine.next_token(token)  # greedy: no logits tensor per step
        else:
            token = _pick(engine.forward([token]), sampling, gen)


def complete(engine: Engine, prompt: Sequence[int], max_new_tokens: int, **kwargs) -> list[int]:
    """All tokens :func:`generate` yields, as a list."""
    return list(generate(engine, prompt, max_new_tokens, **kwargs))
