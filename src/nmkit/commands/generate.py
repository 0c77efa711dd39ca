"""`nmkit generate MODEL --prompt TEXT [--chat] [--stream]`: text from the lean decode runtime.

The text goes to stdout (one newline added at the end); a one-line summary with token counts and
prefill/decode speed goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import sys

from nmkit.errors import UserError
from nmkit.runtime.engine import WEIGHT_KINDS
from nmkit.runtime.generate import Sampling
from nmkit.runtime.textgen import load_text_model


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options `generate` and `serve` share. Numbers are parsed by :func:`engine_options`
    so that a bad one is reported in one line."""
    parser.add_argument("model", help="built-in alias (smollm2-135m), local HF directory (e.g. a `nmkit prune` "
                                      "output) or HF id; Llama-family models (Llama, SmolLM2, Qwen2, Mistral)")
    parser.add_argument("--weights", default="fp32", help=f"how the block Linears are stored: "
                        f"{', '.join(WEIGHT_KINDS)} (int8/int4: quantized kept values; default fp32)")
    parser.add_argument("--head", default=None, metavar="KIND", help="the LM head's kind (default: the weights' "
                        "kind for fp32/bf16, int8 for int8/int4)")
    parser.add_argument("--threads", default=None, metavar="T", help="compute threads (default: $NMKIT_THREADS, "
                        "else torch's thread count)")
    parser.add_argument("--max-seq", default=None, metavar="L", help="context length in tokens: prompt plus "
                        "generated (default: the model's, at most 2048)")


def _number(value: str | None, flag: str, kind: type, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float | int | None:
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    bad = (number is None or (isinstance(number, float) and not math.isfinite(number))
           or (low is not None and (number <= low if low_open else number < low))
           or (high is not None and number > high))
    if bad:
        bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "",
                  f"<= {high}" if high is not None else ""]
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{flag} must be {what} {' and '.join(b for b in bounds if b)}, got {value!r}".strip())
    return number


def engine_options(args: argparse.Namespace) -> dict:
    """Checked keyword arguments for :func:`nmkit.runtime.textgen.load_text_model`."""
    if args.weights not in WEIGHT_KINDS:
        raise UserError(f"unknown --weights {args.weights!r}: choose one of {', '.join(WEIGHT_KINDS)}")
    if args.head is not None and args.head not in WEIGHT_KINDS:
        raise UserError(f"unknown --head {args.head!r}: choose one of {', '.join(WEIGHT_KINDS)}")
    return {"weights": args.weights, "head": args.head,
            "threads": _number(args.threads, "--threads", int, 1),
            "max_seq": _number(args.max_seq, "--max-seq", int, 2)}


def quiet_loading() -> None:
    """No progress bars while the model loads: stderr carries the summary (generate) or the log (serve)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--prompt", default=None, metavar="TEXT", help="the prompt ('-' reads it from stdin)")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the tokenizer's chat template")
    parser.add_argument("--stream", action="store_true", help="print the text as it is decoded")
    parser.add_argument("--max-new-tokens", default="256", metavar="N",
                        help="stop after N new tokens (default 256; generation also stops at end of sequence)")
    parser.add_argument("--temperature", default="0", metavar="T", help="0 (default) decodes greedily; "
                        "above 0 samples")
    parser.add_argument("--top-p", default="1", metavar="P", help="nucleus sampling: sample from the smallest "
                        "set of tokens whose probability reaches P (default 1)")
    parser.add_argument("--seed", default=None, metavar="S", help="seed for sampling (default: random)")


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if prompt is None:
        raise UserError("give the prompt with --prompt TEXT (or --prompt - to read it from stdin)")
    if not prompt:
        raise UserError("the prompt is empty; give some text with --prompt")
    max_new = _number(args.max_new_tokens, "--max-new-tokens", int, 1)
    sampling = Sampling(temperature=_number(args.temperature, "--temperature", float, 0),
                        top_p=_number(args.top_p, "--top-p", float, 0, 1, low_open=True),
                        seed=_number(args.seed, "--seed", int, 0))
    quiet_loading()
    model = load_text_model(args.model, **engine_options(args))
    ids = model.encode_chat([{"role": "user", "content": prompt}]) if args.chat else model.encode(prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give some text with --prompt")
    if len(ids) + max_new > model.max_seq:
        raise UserError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {max_new} exceed the context of "
                        f"{model.max_seq} tokens; shorten the prompt, lower --max-new-tokens or raise --max-seq")
    run_ = model.generation(ids, max_new, sampling=sampling)
    pieces = []
    for piece in run_:
        pieces.append(piece)
        if args.stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write(("" if args.stream else "".join(pieces)) + "\n")
    sys.stdout.flush()
    s = run_.stats
    info = model.engine.info
    print(f"nmkit generate: {s.prompt_tokens} prompt tokens, {s.completion_tokens} new tokens "
          f"({s.finish_reason}); prefill {s.prefill_tok_s:.1f} tok/s, decode {s.decode_tok_s:.1f} tok/s "
          f"({info.weights} weights, {info.head} head, {info.isa}, {info.threads} thread"
          f"{'s' if info.threads != 1 else ''})", file=sys.stderr)
    return 0
