"""Which layers a command touches: glob patterns over qualified module names, one rule everywhere.

``include`` None means "the caller's default set"; otherwise a name must match one of its globs.
A name matching any ``exclude`` glob is always left out. Globs are case-sensitive ``fnmatch``
patterns (``"*mlp*"``, ``"model.layers.0.*"``, ``"*lm_head"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from nmkit.errors import UserError


def matches(name: str, globs: Iterable[str] | None) -> bool:
    """True when ``name`` matches at least one of ``globs`` (none given: False)."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs or ())


def selected(name: str, include: Iterable[str] | None, exclude: Iterable[str] | None, default: bool = True) -> bool:
    """``name`` is chosen by ``include`` (``default`` when include is None) and not excluded."""
    chosen = matches(name, include) if include is not None else default
    return chosen and not matches(name, exclude)


def parse_layers(spec: str | None) -> list[int] | None:
    """Block numbers from ``--attention-layers``: ``"2-5,9"`` -> [2, 3, 4, 5, 9]; None stays None (every layer)."""
    if spec is None:
        return None
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--attention-layers {spec!r}: use layer numbers and ranges, e.g. 2-29 or 0,1,5") from None
    if not layers or min(layers) < 0:
        raise UserError(f"--attention-layers {spec!r} selects no layer")
    return layers
