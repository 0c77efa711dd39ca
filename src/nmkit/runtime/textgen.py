"""Text in, text out on an :class:`~nmkit.runtime.engine.Engine`: what ``nmkit generate`` and ``nmkit serve`` share.

:func:`load_text_model` loads a model and its tokenizer and packs the engine. :class:`TextGeneration`
runs one request and yields text pieces as tokens are decoded: an :class:`IncrementalDetokenizer`
turns token ids into text without splitting multi-byte characters, and :class:`StopStrings` cuts the
text at a stop string without ever emitting part of one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nmkit import models
from nmkit.errors import UserError
from nmkit.runtime.engine import Engine
from nmkit.runtime.generate import Sampling, generate

DEFAULT_MAX_SEQ = 2048


class IncrementalDetokenizer:
    """Token ids in, new text out, equal in total to decoding all ids at once.

    Each new token is decoded together with the few tokens before it, because a token's text can
    depend on its neighbours (a leading space merged by the decoder, or bytes of one UTF-8 character
    spread over several tokens). Text ending in an incomplete character is held back until the rest
    arrives; :meth:`flush` returns whatever is left at the end.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of the text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


class StopStrings:
    """Cut generated text before the first stop string to be completed. Text that could still become
    the start of a stop string is held back, so no part of a stop string is ever emitted."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self._pending += text
        # Generation stops as soon as a stop string is complete: the match that ends first wins
        # (a longer one starting earlier may never be completed), the earlier start on a tie.
        ends = [(i + len(s), i) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if ends:
            out, self._pending = self._pending[:min(ends)[1]], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self._pending.endswith(s[:k])), default=0)
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


@dataclass
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int = 0
    prefill_s: float = 0.0  # prompt forward pass and first token
    decode_s: float = 0.0  # every later token
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "cancelled"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.completion_tokens - 1  # the first new token comes out of the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class TextGeneration:
    """One request: iterate for text pieces; ``tokens`` and ``stats`` are complete afterwards.

    ``cancelled`` is polled before each token (a server cancels on shutdown or when a client goes
    away). ``lock`` guards every tokenizer call when other threads share the tokenizer.
    """

    def __init__(self, engine: Engine, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int, *,
                 sampling: Sampling | None = None, stop_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 cancelled: Callable[[], bool] | None = None, lock: Any = None) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.sampling, self.stop_ids, self.stop = sampling or Sampling(), tuple(stop_ids), tuple(stop)
        self.cancelled = cancelled or (lambda: False)
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.tokens: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))

    def __iter__(self) -> Iterator[str]:
        detok, stops, stats = IncrementalDetokenizer(self.tokenizer), StopStrings(self.stop), self.stats
        tokens = generate(self.engine, self.prompt_ids, self.max_new_tokens, sampling=self.sampling,
                          stop_ids=self.stop_ids)
        stats.finish_reason = "length"
        while True:
            if self.cancelled():
                stats.finish_reason = "cancelled"
                return
            t0 = time.perf_counter()
            token = next(tokens, None)  # the engine's work for this token, nothing else, is timed
            if token is None:
                break
            if self.tokens:
                stats.decode_s += time.perf_counter() - t0
            else:
                stats.prefill_s = time.perf_counter() - t0
            self.tokens.append(token)
            stats.completion_tokens += 1
            if token in self.stop_ids:
                stats.finish_reason = "stop"
                break
            with self.lock:
                piece = detok.add(token)
            text, hit = stops.feed(piece)
            if text:
                yield text
            if hit:
                stats.finish_reason = "stop"
                return
        with self.lock:
            piece = detok.flush()
        text, hit = stops.feed(piece)
        if hit:
            stats.finish_reason = "stop"
        else:
            text += stops.flush()
        if text:
            yield text


@dataclass
class TextModel:
    """An engine with its tokenizer, end-of-sequence ids and the name it is served under."""

    engine: Engine
    tokenizer: Any
    stop_ids: tuple[int, ...]
    name: str

    @property
    def max_seq(self) -> int:
        return self.engine.max_seq

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """A plain prompt, with the tokenizer's usual special tokens (e.g. BOS)."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages through the tokenizer's chat template, ending with the assistant's turn opened."""
        if not self.has_chat_template:
            raise UserError(f"the tokenizer of {self.name} has no chat template; send a plain prompt instead")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template's own error (e.g. roles out of order) is bad input
            raise UserError(f"the chat template rejected the messages: {exc}") from None
        # The template writes the special tokens itself; adding BOS again would double it.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generation(self, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs: Any) -> TextGeneration:
        return TextGeneration(self.engine, self.tokenizer, prompt_ids, max_new_tokens, stop_ids=self.stop_ids,
                              **kwargs)


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else (value or []))
    return tuple(sorted(ids))


def load_text_model(model: str, *, weights: str = "fp32", head: str | None = None, max_seq: int | None = None,
                    threads: int | None = None, name: str | None = None) -> TextModel:
    """Load ``model`` (alias, local directory or HF id) and its tokenizer, and pack the engine.
    ``max_seq`` defaults to the model's context, at most :data:`DEFAULT_MAX_SEQ`."""
    source = models.resolve(model)
    if source.kind != "causal-lm":
        raise UserError(f"{model!r} is not a causal language model; generation needs one")
    hf_model = models.load(source)
    tokenizer = models.load_tokenizer(source)
    context = getattr(hf_model.config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ
    max_seq = max_seq or min(context, DEFAULT_MAX_SEQ)
    engine = Engine(hf_model, weights=weights, head=head, max_seq=max_seq, threads=threads)
    return TextModel(engine, tokenizer, _eos_ids(hf_model, tokenizer), name or source.name)
