"""``plan.json``: the pattern chosen for each layer, with what the plan predicts and how it was made."""

from __future__ import annotations

import json
from pathlib import Path

from nmkit.errors import UserError
from nmkit.jsonout import dumps
from nmkit.patterns import NM, PatternError
from nmkit.plan.cost import DENSE

FORMAT = "nmkit-plan"
VERSION = 1


def write(path: str | Path, body: dict) -> Path:
    """Write ``body`` (with ``layers``: name -> pattern) to ``path`` through a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps({"format": FORMAT, "version": VERSION, **body}, indent=2) + "\n")
    tmp.replace(path)
    return path


def read(path: str | Path) -> dict:
    """A checked plan: ``layers`` maps each layer to "dense" or a valid N:M pattern."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan file {str(path)!r} does not exist; write one with `nmkit plan MODEL --out plan.json`")
    try:
        body = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"plan file {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not an nmkit plan (format {FORMAT!r}); write one with `nmkit plan`")
    layers = body.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise UserError(f"plan {str(path)!r} has no layers")
    for name, pattern in layers.items():
        if pattern != DENSE:
            try:
                NM.parse(str(pattern))
            except PatternError:
                raise UserError(f"plan {str(path)!r}: layer {name} has pattern {pattern!r}, not 'dense' or N:M "
                                "(keep N of every M, e.g. 2:4)") from None
    return body
