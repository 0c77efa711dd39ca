"""Text data: WikiText-2 raw from a data directory, HF ``datasets`` when reachable, else offline text.

Resolution order for :func:`load_text`:

1. a data directory (argument, or ``$NMKIT_DATA``) holding ``wikitext-2-raw/wiki.{train,valid,test}.raw``;
   a directory given explicitly that lacks those files is an error, never a silent fallback;
2. Hugging Face ``datasets`` (``wikitext-2-raw-v1``) when that package is installed and reachable;
3. the English text of ``pydoc_data.topics``, which ships with CPython, so everything runs offline.

The returned :class:`Text` names its source so reports can say what was measured.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nmkit.errors import UserError

SPLITS = ("train", "valid", "test")
WIKITEXT_DIR = "wikitext-2-raw"
# sha256 of the complete WikiText-2 raw test split (as in the original wikitext-2-raw-v1.zip).
WIKITEXT_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"


@dataclass(frozen=True)
class Text:
    """A text split plus where it came from (goes into every report)."""

    dataset: str  # "wikitext-2-raw" or "pydoc_data.topics"
    source: str  # file path, "hf-datasets:wikitext/wikitext-2-raw-v1" or "python-stdlib"
    split: str
    text: str = field(repr=False)
    sha256: str  # of the source file bytes (or of the text when there is no file)

    @property
    def info(self) -> dict:
        return {"dataset": self.dataset, "source": self.source, "split": self.split, "sha256": self.sha256}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The configured data directory: the argument, else ``$NMKIT_DATA``, else None."""
    value = explicit if explicit is not None else os.environ.get("NMKIT_DATA") or None
    return Path(value).expanduser() if value else None


def check_data_dir(directory: str | os.PathLike) -> Path:
    """Raise a clear :class:`UserError` unless ``directory`` holds the WikiText-2 raw files."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UserError(f"data directory {str(root)!r} does not exist; pass --data-dir DIR or set NMKIT_DATA")
    missing = [s for s in SPLITS if not (root / WIKITEXT_DIR / f"wiki.{s}.raw").is_file()]
    if missing:
        raise UserError(
            f"data directory {str(root)!r} has no WikiText-2 raw files ({', '.join(f'wiki.{s}.raw' for s in missing)} "
            f"missing under {WIKITEXT_DIR}/); point --data-dir/NMKIT_DATA at the folder that contains "
            f"{WIKITEXT_DIR}/, or unset it to use the built-in offline text"
        )
    return root


def wikitext_rows_joined(raw: str) -> str:
    """The string the SparseGPT/Wanda protocol evaluates: the split's rows joined with ``"\\n\\n"``.

    In the raw file each row is one line and an empty row is written as ``" \\n"``; this inverts that.
    """
    rows = ["" if line == " \n" else line for line in raw.splitlines(keepends=True)]
    return "\n\n".join(rows)


def _from_dir(root: Path, split: str) -> Text:
    path = check_data_dir(root) / WIKITEXT_DIR / f"wiki.{split}.raw"
    raw_bytes = path.read_bytes()
    raw = raw_bytes.decode("utf-8")
    text = wikitext_rows_joined(raw) if split == "test" else raw
    return Text("wikitext-2-raw", str(path.resolve()), split, text, hashlib.sha256(raw_bytes).hexdigest())


def _from_hf_datasets(split: str) -> Text | None:
    try:
        import datasets  # optional: not a dependency
    except ImportError:
        return None
    try:
        hf_split = {"valid": "validation"}.get(split, split)
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"]
    except Exception:  # noqa: BLE001 - unreachable hub or missing cache: fall back
        return None
    text = "\n\n".join(rows)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Text("wikitext-2-raw", "hf-datasets:wikitext/wikitext-2-raw-v1", split, text, digest)


def _from_pydoc(split: str) -> Text:
    from pydoc_data.topics import topics

    # Deterministic topic split so calibration text never overlaps evaluation text.
    names = sorted(topics)
    chosen = {
        "test": names[0::5],
        "valid": names[1::5],
        "train": [n for i, n in enumerate(names) if i % 5 not in (0, 1)],
    }[split]
    text = "\n\n".join(topics[n] for n in chosen)
    return Text("pydoc_data.topics", "python-stdlib", split, text, hashlib.sha256(text.encode()).hexdigest())


# The second evaluation text, reported beside every WikiText figure: does a pruned model generalise
# beyond the kind of text it was calibrated on? Python's language reference (ships with CPython; no
# calibration source uses it), its held-out topic split, 16 windows of 512 tokens.
SECOND_TEXT = "pydoc_data.topics"
SECOND_SEQLEN, SECOND_WINDOWS = 512, 16


def second_text() -> Text:
    """The held-out split of ``pydoc_data.topics``: the second text every prune report evaluates."""
    return _from_pydoc("test")


def load_text(split: str = "test", data_dir_: str | os.PathLike | None = None) -> Text:
    """Load a text split (``train``, ``valid`` or ``test``) by the resolution order in the module docs."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = data_dir(data_dir_)
    if root is not None:
        return _from_dir(root, split)
    return _from_hf_datasets(split) or _from_pydoc(split)


def tokenize(tokenizer, text: Text | str) -> torch.Tensor:
    """Tokenise a whole text once, as a 1-D LongTensor (no truncation)."""
    import transformers

    body = text.text if isinstance(text, Text) else text
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence longer than max length": we window it
    try:
        return tokenizer(body, return_tensors="pt").input_ids[0]
    finally:
        transformers.logging.set_verbosity(verbosity)


def calibration_windows(ids: torch.Tensor, count: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``count`` random windows of ``seqlen`` tokens from ``ids`` (seeded), shape (count, seqlen)."""
    if ids.numel() <= seqlen:
        raise UserError(f"calibration text has {ids.numel()} tokens, fewer than --calib-seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (count,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
