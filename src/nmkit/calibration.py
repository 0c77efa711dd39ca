"""Calibration sets: which text a calibrated prune fits its layers to, and in what mix.

Layer solves fitted to a few thousand tokens of one kind of text over-fit it: calibrated on WikiText
alone, a 2:4 SmolLM2 stays near 2x dense perplexity on WikiText but reaches about 7x on Python
documentation. The default calibration is therefore a **mix** of kinds of text every install has offline:

- ``prose``: the train split of :func:`nmkit.data.load_text` (WikiText-2 train when available);
- ``code``: Python source of a fixed list of standard-library modules;
- ``docs``: the same modules' docstrings (module, classes, functions);
- ``chat``: prose paragraphs as question/answer turns in the model's chat template (if it has one).

The evaluation's second text, ``pydoc_data.topics`` (the language reference), is in none of them.
``wikitext`` keeps the old single-source calibration (the published protocol). Windows are drawn
per source with the calibration seed; :class:`Calibration` records the sizes and digests for reports.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import torch

from nmkit import data, preflight
from nmkit.errors import UserError

# Modules whose source and documentation are calibration text: pure-Python, import without side effects.
STDLIB_MODULES = ("argparse", "base64", "bisect", "calendar", "collections", "csv", "dataclasses", "datetime",
                  "decimal", "difflib", "enum", "fractions", "functools", "heapq", "json", "logging", "pathlib",
                  "pprint", "random", "shlex", "shutil", "statistics", "string", "tempfile", "textwrap",
                  "typing", "unittest", "urllib.parse", "uuid", "zipfile")
# Share of the samples each source gets in the default mix (prose first: it is the most varied text).
MIX = {"prose": 0.4, "code": 0.2, "docs": 0.2, "chat": 0.2}
CHOICES = ("mix", "wikitext")


@dataclass(frozen=True)
class Calibration:
    samples: torch.Tensor  # (count, seqlen) token ids
    info: dict  # what the report records: sources, their sizes and digests, seed


def _import(name: str):
    import importlib

    return importlib.import_module(name)


def code_text() -> str:
    return "\n\n".join(inspect.getsource(_import(name)) for name in STDLIB_MODULES)


def docs_text() -> str:
    """The modules' docstrings (module, then each public class and function, by name). Docstrings only: a
    rendered page would also show default values and module data, which depend on the process's state
    (logging handlers, tempfile's directory), and a resumed run must draw the same windows."""
    parts = []
    for name in STDLIB_MODULES:
        module = _import(name)
        parts.append(f"{name}\n\n{inspect.getdoc(module) or ''}")
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and inspect.getdoc(obj):
                parts.append(f"{name}.{attr}\n\n{inspect.getdoc(obj)}")
    return "\n\n".join(parts)


def chat_text(tokenizer, prose: str) -> str | None:
    """Consecutive prose paragraphs as (user asks to continue, assistant continues) turns, or None without a
    chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    paragraphs = [p.strip() for p in prose.split("\n") if len(p.strip()) > 200]
    turns = []
    for first, second in zip(paragraphs[0::2], paragraphs[1::2], strict=False):
        turns.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Continue this text:\n{first}"}, {"role": "assistant", "content": second}],
            tokenize=False))
    return "\n".join(turns)


def _counts(total: int, shares: dict[str, float]) -> dict[str, int]:
    """``total`` split by ``shares`` with largest remainders, every source at least one sample if it can."""
    raw = {k: total * v / sum(shares.values()) for k, v in shares.items()}
    counts = {k: int(x) for k, x in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def build(tokenizer, kind: str, count: int, seqlen: int, seed: int = 0, data_dir=None,
          hidden_size: int | None = None) -> Calibration:
    """``count`` windows of ``seqlen`` tokens: the ``mix`` of sources above, or ``wikitext`` (the train split only).

    Refused before any window is drawn: a source too short for its share, activations (of ``hidden_size``)
    that cannot fit in memory.
    """
    if kind not in CHOICES:
        raise UserError(f"unknown --calib-data {kind!r}; choose one of {', '.join(CHOICES)}")
    train = data.load_text("train", data_dir)
    texts: dict[str, str | None] = {"prose": train.text}
    if kind == "mix":
        texts |= {"code": code_text(), "docs": docs_text(), "chat": chat_text(tokenizer, train.text)}
    texts = {k: v for k, v in texts.items() if v}
    shares = {k: MIX[k] for k in texts} if kind == "mix" else {"prose": 1.0}
    counts = {name: n for name, n in _counts(count, shares).items() if n > 0}
    ids = {name: data.tokenize(tokenizer, texts[name]) for name in counts}
    for name, n in counts.items():
        if n * seqlen > ids[name].numel():  # more than the whole text: the windows could only repeat it
            raise UserError(f"--calib-samples {count} x --calib-seqlen {seqlen} = {count * seqlen} tokens, but the "
                            f"{name} calibration text (for {n} of the samples) has {ids[name].numel()}; lower "
                            f"--calib-samples or --calib-seqlen")
    preflight.check_activation_memory(count, seqlen, hidden_size)
    parts, sources = [], {}
    for i, (name, n) in enumerate(counts.items()):
        parts.append(data.calibration_windows(ids[name], n, seqlen, seed + i))
        sources[name] = {"samples": n, "text_tokens": ids[name].numel(),
                         "sha256": hashlib.sha256(texts[name].encode()).hexdigest()}
    sources["prose"] |= train.info
    info = {"data": kind, "samples": count, "seqlen": seqlen, "seed": seed, "sources": sources}
    if kind == "wikitext":  # the reports' old flat form, so existing readers keep working
        info = {**train.info, "samples": count, "seqlen": seqlen, "seed": seed, "data": kind}
    return Calibration(torch.cat(parts), info)


def add_arguments(parser, what: str = "calibrated methods") -> None:
    """The calibration flags every calibrated command shares."""
    parser.add_argument("--calib-data", default="mix", choices=CHOICES,
                        help="calibration text: mix (default: prose, Python code, library docs and chat turns, "
                             "so the result holds beyond one kind of text) or wikitext (the train split only, the "
                             "published protocol)")
    parser.add_argument("--calib-samples", type=int, default=64, metavar="K",
                        help=f"calibration sequences, for {what} (default 64)")
    parser.add_argument("--calib-seqlen", type=int, default=512, metavar="L",
                        help="tokens per calibration sequence (default 512)")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed for picking calibration windows (default 0)")


def from_args(tokenizer, args, hidden_size: int | None = None) -> Calibration:
    """The calibration set the flags of :func:`add_arguments` ask for."""
    if args.calib_samples < 1 or args.calib_seqlen < 2:
        raise UserError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
    return build(tokenizer, args.calib_data, args.calib_samples, args.calib_seqlen, args.calib_seed, args.data_dir,
                 hidden_size)


def describe(info: dict) -> str:
    """One sentence for reports and model cards: how many tokens of which texts, which seed."""
    head = f"{info.get('samples')} x {info.get('seqlen')} tokens"
    if "sources" in info:
        parts = ", ".join(f"{name} {s['samples']}" for name, s in info["sources"].items())
        prose = info["sources"].get("prose", {})
        return (f"{head}, a mix of offline texts (samples per source: {parts}; prose from {prose.get('dataset')} "
                f"{prose.get('split')}), seed {info.get('seed')}")
    return f"{head} of {info.get('dataset')} {info.get('split')} ({info.get('source')}), seed {info.get('seed')}"
